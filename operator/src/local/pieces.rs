//! A manifest file as pieces, one per document: an edit to one document of a file of hundreds
//! leaves the others' text as it was, and those are not parsed again. Parsing YAML was most of
//! what a change to a large file cost (500 pods: about 12 ms of YAML for one pod deleted).

use std::collections::HashMap;
use std::ops::Range;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// An object of the snapshot: (kind, namespace, name).
pub type ObjectId = (String, String, String);

/// A piece of a file as it was put in the snapshot, and what it defined.
#[derive(Debug, Clone)]
pub struct Piece {
    pub digest: [u8; 32],
    /// Where its first document stands among the file's, and how many it holds (empty
    /// documents are none, as for the YAML parser).
    pub first_doc: usize,
    pub docs: usize,
    /// What it defines, each with its document's place in the file.
    pub objects: Vec<(ObjectId, usize)>,
}

impl Piece {
    /// Whether it may move in the file and stay as it is: what it defines keeps no creation
    /// time in the snapshot (Services, Pods, EndpointSlices, Namespaces and ServiceAccounts are
    /// held without one). A custom resource's creation order is its place in the file.
    pub fn placeless(&self) -> bool {
        self.objects.iter().all(|((kind, _, _), _)| {
            matches!(kind.as_str(), "Service" | "EndpointSlice" | "Pod" | "Namespace" | "ServiceAccount")
        })
    }
}

/// A file's text cut at its document markers: each piece a YAML stream of its own, a `---`
/// line staying with the document it opens. A text with directives or document-end markers
/// (`%` or `...` lines), where a document's meaning may depend on the lines before its marker,
/// is one piece. A marker line cannot occur inside a document (YAML forbids `---` at the start
/// of a line in any scalar), so the pieces parse to the documents of the whole text.
pub fn split(text: &str) -> Vec<Range<usize>> {
    let marker = |line: &str, m: &str| {
        line.strip_prefix(m).is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    };
    let mut cuts = vec![0];
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.starts_with('%') || marker(line, "...") {
            return std::iter::once(0..text.len()).collect();
        }
        if at > 0 && marker(line, "---") {
            cuts.push(at);
        }
        at += line.len();
    }
    cuts.push(text.len());
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}

/// What becomes of one piece of a file's new text.
#[derive(Debug, PartialEq, Eq)]
pub enum Planned {
    /// The old piece of this index, of the same text, stays in the snapshot as it is.
    Kept(usize),
    /// A piece to parse: its digest and where it is in the text.
    New { digest: [u8; 32], range: Range<usize> },
}

/// Matches a file's new text against its pieces before (`old`, whose objects are still in the
/// snapshot). An old piece of the same text is kept when it is placeless, or when every piece
/// before it was kept where it stood (so its documents keep their places, and a custom
/// resource its creation order); the rest is to parse. Nothing is parsed here, so a file's
/// documents are never all held at once.
pub fn plan(text: &str, old: &[Piece]) -> Vec<Planned> {
    let mut by_digest: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
    for (i, piece) in old.iter().enumerate() {
        by_digest.entry(piece.digest).or_default().push(i);
    }
    let mut in_place = true;
    let mut planned = Vec::new();
    for (j, range) in split(text).into_iter().enumerate() {
        let digest: [u8; 32] = Sha256::digest(&text.as_bytes()[range.clone()]).into();
        let kept = by_digest.get_mut(&digest).and_then(|candidates| {
            let at = candidates.iter().position(|&i| (in_place && i == j) || old[i].placeless())?;
            Some(candidates.remove(at))
        });
        in_place &= kept == Some(j);
        planned.push(match kept {
            Some(i) => Planned::Kept(i),
            None => Planned::New { digest, range },
        });
    }
    planned
}

/// The documents of the piece of `text` at `range`. Err: it is not YAML (the message is the
/// whole text's, so its line numbers are the file's).
pub fn parse(text: &str, range: Range<usize>) -> Result<Vec<Value>, String> {
    serde_saphyr::from_multiple::<Value>(&text[range]).map_err(|e| {
        let whole = serde_saphyr::from_multiple::<Value>(text).err();
        whole.map_or_else(|| e.to_string(), |e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<Value> {
        plan(text, &[])
            .into_iter()
            .flat_map(|p| match p {
                Planned::New { range, .. } => parse(text, range).unwrap(),
                Planned::Kept(_) => unreachable!("nothing to keep"),
            })
            .collect()
    }

    #[test]
    fn the_pieces_parse_to_the_documents_of_the_whole_text() {
        let texts = [
            "",
            "# a comment\n",
            "a: 1\n",
            "a: 1\n---\n",
            "---\na: 1\n",
            "a: 1\n---\n---\nb: 2\n",
            "---\n---\n",
            "--- {a: 1}\n--- {b: 2}\n",
            "a: |\n  x\n  --- not a marker\n---\nb: 2\n",
            "a: 1\r\n---\r\nb: 2\r\n",
            "---\n# only a comment\n---\nc: 3",
            "- 1\n- 2\n---\n- 3",
            "a: 1\n--- \nb: 1\n",
            "a: 1\n---x: 2\n",
            "\u{feff}a: 1\n---\nb: 2\n",
            "a: [1,\n2]\n---\nb: 3\n",
            "a: 1\n---\n\n\n",
            "%YAML 1.2\n---\na: 1\n...\n%YAML 1.2\n---\nb: 2\n",
        ];
        for text in texts {
            let whole: Vec<Value> = serde_saphyr::from_multiple(text).unwrap();
            assert_eq!(parsed(text), whole, "{text:?}");
        }
        let text = "a: 1\n---\nb: 2\n--- {c: 3}\n";
        let pieces: Vec<&str> = split(text).into_iter().map(|r| &text[r]).collect();
        assert_eq!(pieces, ["a: 1\n", "---\nb: 2\n", "--- {c: 3}\n"]);
        assert_eq!(split("%YAML 1.2\n---\na: 1\n").len(), 1, "directives: one piece");
        assert_eq!(split("a: 1\n...\n---\nb: 2\n").len(), 1, "a document end: one piece");
    }

    #[test]
    fn unchanged_pieces_are_kept_where_they_stand_or_anywhere_when_placeless() {
        let pod = |n: u32| format!("---\nkind: Pod\nmetadata: {{name: p{n}}}\n");
        let route = |n: u32| format!("---\nkind: TrafficRoute\nmetadata: {{name: r{n}}}\n");
        let text = [route(0), pod(1), route(2), pod(3)].concat();
        let old: Vec<Piece> = plan(&text, &[])
            .into_iter()
            .enumerate()
            .map(|(i, planned)| {
                let Planned::New { digest, range } = planned else { unreachable!() };
                let docs = parse(&text, range).unwrap();
                let kind = docs[0]["kind"].as_str().unwrap().to_string();
                Piece {
                    digest,
                    first_doc: i,
                    docs: 1,
                    objects: vec![((kind, String::new(), String::new()), i)],
                }
            })
            .collect();
        let kept =
            |planned: &[Planned]| planned.iter().map(|p| matches!(p, Planned::Kept(_))).collect::<Vec<_>>();
        // The first route deleted: the pods move and are kept; the route after it moves and is
        // parsed again (its creation order is its place); a new pod is parsed.
        let planned = plan(&[pod(1), route(2), pod(3), pod(4)].concat(), &old);
        assert_eq!(kept(&planned), [true, false, true, false]);
        assert_eq!((&planned[0], &planned[2]), (&Planned::Kept(1), &Planned::Kept(3)));
        // Nothing before it moved: the route is kept too.
        let planned = plan(&[route(0), pod(1), route(2), pod(5)].concat(), &old);
        assert_eq!(kept(&planned), [true, true, true, false]);
        // The same piece twice: one is kept, the other parsed.
        let planned = plan(&[route(0), pod(1), pod(1)].concat(), &old);
        assert_eq!(kept(&planned), [true, true, false]);
        // Not YAML: the whole text's message, with the file's line numbers.
        let text = format!("{}---\n{{ nope\n", pod(1));
        let Some(Planned::New { range, .. }) = plan(&text, &old).pop() else { panic!() };
        let e = parse(&text, range).unwrap_err();
        assert!(e.contains("line 5"), "{e}");
    }
}
