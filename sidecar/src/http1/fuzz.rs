//! The fast path's half of the fuzz targets in `crate::fuzzing`: what must hold of heads and
//! chunked framing whatever the bytes, and that route matching on a head parsed in place agrees
//! with matching on the request hyper would build from the same bytes.

use http::uri::Authority;

use super::head::{crlf_only, host_port, parse_length, Head, View};
use crate::route::table::RouteTable;
use crate::wire::framing::Chunked;

fn named<'a>(head: &'a Head, data: &'a [u8], name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    head.headers
        .iter()
        .filter(move |(n, _)| data[n.clone()].eq_ignore_ascii_case(name))
        .map(move |(_, v)| &data[v.clone()])
}

pub(crate) fn request_head(data: &[u8]) {
    let mut head = Head::default();
    let Ok(Some(())) = Head::parse(data, &mut head) else { return };
    assert!(head.len <= data.len());
    let ranges = head.headers.iter().flat_map(|(n, v)| [n, v]).chain([&head.method, &head.path]);
    for r in ranges.chain(head.authority.iter()) {
        assert!(r.start <= r.end && r.end <= head.len, "a position outside the head: {r:?}");
    }
    let view = View { head: &head, buf: data };
    let _ = (crate::route::table::RequestView::method(&view), crate::route::table::RequestView::path(&view));
    if let Some(a) = &head.authority {
        let _ = host_port(view.str(a));
    }
    if head.unusual {
        return; // hyper's to judge
    }
    // What the fast path serves itself.
    let lengths: Vec<&[u8]> = named(&head, data, b"content-length").collect();
    assert!(lengths.len() <= 1, "more than one Content-Length on the fast path");
    if let Some(v) = lengths.first() {
        assert_eq!(parse_length(v), Some(head.content_length), "a length that is not digits");
    }
    assert!(named(&head, data, b"host").count() <= 1, "more than one Host on the fast path");
    assert_eq!(named(&head, data, b"transfer-encoding").count(), 0, "Transfer-Encoding on the fast path");
    assert!(crlf_only(&data[..head.len]), "a bare LF on the fast path");
}

pub(crate) fn chunked(data: &[u8]) {
    let mut whole = Chunked::default();
    let all = whole.feed(data);
    let mut splits = vec![data.len() / 3, data.len() / 2, data.len().saturating_sub(1)];
    splits.dedup();
    for split in splits {
        let mut parts = Chunked::default();
        let result = match parts.feed(&data[..split]) {
            Ok(n) if n < split => Ok(n), // the message ended inside the first part
            Ok(n) => parts.feed(&data[split..]).map(|m| n + m),
            Err(e) => Err(e),
        };
        assert_eq!(result, all, "split at {split}");
        if all.is_ok() {
            assert_eq!(parts, whole, "split at {split}");
        }
    }
    // Decoding ends where scanning does; its data and trailer section are the message less its
    // framing, so together they are never longer than what was used.
    let mut decoder = Chunked::default();
    let (mut ranges, mut trailer) = (Vec::new(), Vec::new());
    let decoded = decoder.decode(data, &mut ranges, &mut trailer);
    assert_eq!(decoded, all);
    if let Ok(used) = decoded {
        assert_eq!(decoder, whole);
        let data_len: usize = ranges.iter().map(|r| r.len()).sum();
        assert!(ranges.iter().all(|r| r.end <= used));
        assert!(data_len + trailer.len() <= used);
        if whole == Chunked::Done {
            assert!(trailer.ends_with(b"\r\n"), "a finished message ends its trailer section");
        }
    }
}

pub(crate) fn route_match(data: &[u8], table: &RouteTable) {
    let mut head = Head::default();
    let Ok(Some(())) = Head::parse(data, &mut head) else { return };
    if head.unusual {
        return; // only hyper's path serves it
    }
    let view = View { head: &head, buf: data };
    let fast_authority = head.authority.as_ref().map(|r| view.str(r));
    let (host, port) = fast_authority.map(host_port).map_or((None, None), |(h, p)| (Some(h), p));
    let fast = table.resolve(host, port, None, &view);

    // The request hyper would hand to the proxy: the same bytes through httparse into `http`.
    let mut raw = [httparse::EMPTY_HEADER; 100];
    let mut parsed = httparse::Request::new(&mut raw);
    assert!(
        matches!(parsed.parse(data), Ok(httparse::Status::Complete(_))),
        "the fast path took what httparse refuses"
    );
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else { return };
    let mut builder = http::Request::builder().method(method).uri(path);
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let Ok(request) = builder.body(()) else { return }; // hyper refuses it with 400
    let (parts, ()) = request.into_parts();
    let authority: Option<Authority> = parts.uri.authority().cloned().or_else(|| {
        parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).and_then(|h| h.parse().ok())
    });
    let host = authority.as_ref().map(|a| a.host().trim_start_matches('[').trim_end_matches(']'));
    let general = table.resolve(host, authority.as_ref().and_then(Authority::port_u16), None, &parts);
    match (fast, general) {
        (Ok(a), Ok(b)) => assert!(std::ptr::eq(a, b), "the two paths picked different targets"),
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("the two paths disagree: fast path {:?}, hyper {:?}", a.err(), b.err()),
    }
}
