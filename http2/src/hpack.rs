//! HPACK (RFC 7541): the decoder a peer needs for the other side's header blocks, with its
//! dynamic table and Huffman coding, and literal encodings that touch no table (no dynamic
//! table, no Huffman: a block costs a few bytes more and the encoder holds no state).

use std::borrow::Cow;
use std::collections::VecDeque;

use bytes::Bytes;

use super::huffman;

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Why a header block could not be decoded: a connection error (COMPRESSION_ERROR), since the
/// dynamic table can no longer be trusted.
#[derive(Debug, PartialEq, Eq)]
pub enum HpackError {
    /// The block ended inside a representation.
    Truncated,
    /// An integer longer than any the decoder accepts.
    IntegerOverflow,
    /// Index 0, or past the end of the tables.
    BadIndex(usize),
    InvalidHuffman,
    /// A table size update larger than the limit the server announced, or after a header.
    BadSizeUpdate,
    /// The decoded header list is larger than the limit.
    ListTooLarge,
}

impl std::fmt::Display for HpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => f.write_str("header block truncated"),
            Self::IntegerOverflow => f.write_str("integer too large"),
            Self::BadIndex(i) => write!(f, "no table entry {i}"),
            Self::InvalidHuffman => f.write_str("invalid Huffman string"),
            Self::BadSizeUpdate => f.write_str("invalid dynamic table size update"),
            Self::ListTooLarge => f.write_str("header list too large"),
        }
    }
}

/// A dynamic table entry: name and value as sent.
type Entry = (Vec<u8>, Vec<u8>);

/// A field as decoded: borrowed from the block or the tables, or owned when it was Huffman-coded.
type Decoded<'a> = (Cow<'a, [u8]>, Cow<'a, [u8]>);

/// A decoded header list: every name and value, in order, in one buffer (two allocations for
/// a block, whatever its number of fields). Values can be taken out sharing it ([`Self::share`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fields {
    bytes: Bytes,
    /// For each field, where its name ends and where its value ends in `bytes`.
    ends: Vec<(u32, u32)>,
}

impl Fields {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The fields as (name, value), in the order they were sent.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + '_ {
        let mut start = 0usize;
        self.ends.iter().map(move |&(name_end, value_end)| {
            let (name_end, value_end) = (name_end as usize, value_end as usize);
            let field = (&self.bytes[start..name_end], &self.bytes[name_end..value_end]);
            start = value_end;
            field
        })
    }

    /// `part` (a name or value [`Self::iter`] gave) as a `Bytes` sharing the list's buffer.
    ///
    /// # Panics
    /// When `part` is not a slice of this list.
    pub fn share(&self, part: &[u8]) -> Bytes {
        self.bytes.slice_ref(part)
    }
}

/// Fields as they are decoded.
#[derive(Default)]
struct Builder {
    bytes: Vec<u8>,
    ends: Vec<(u32, u32)>,
}

impl Builder {
    fn push(&mut self, name: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(name);
        let name_end = self.bytes.len() as u32;
        self.bytes.extend_from_slice(value);
        self.ends.push((name_end, self.bytes.len() as u32));
    }

    fn build(self) -> Fields {
        Fields { bytes: Bytes::from(self.bytes), ends: self.ends }
    }
}

impl<'a> FromIterator<(&'a [u8], &'a [u8])> for Fields {
    fn from_iter<I: IntoIterator<Item = (&'a [u8], &'a [u8])>>(iter: I) -> Self {
        let mut fields = Builder::default();
        for (name, value) in iter {
            fields.push(name, value);
        }
        fields.build()
    }
}

/// A connection's decoder: its dynamic table lives as long as the connection.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first.
    table: VecDeque<Entry>,
    /// Sum of the entries' sizes (name + value + 32 each).
    size: usize,
    /// The size the encoder last set (at most `limit`).
    max: usize,
    /// SETTINGS_HEADER_TABLE_SIZE as the server announced it.
    limit: usize,
}

impl Decoder {
    pub fn new(limit: usize) -> Self {
        Self { table: VecDeque::new(), size: 0, max: limit, limit }
    }

    /// Decodes one whole header block. `max_list` bounds the decoded list, counted as HTTP/2's
    /// SETTINGS_MAX_HEADER_LIST_SIZE counts it (name + value + 32 per field).
    pub fn decode(&mut self, block: &[u8], max_list: usize) -> Result<Fields, HpackError> {
        // Offsets into the decoded list are u32s.
        let max_list = max_list.min(u32::MAX as usize);
        let mut fields = Builder {
            bytes: Vec::with_capacity((block.len() * 2).min(max_list)),
            ends: Vec::with_capacity(block.len().min(16)),
        };
        let mut list = 0usize;
        let mut pos = 0usize;
        while pos < block.len() {
            let first = block[pos];
            let (name, value): Decoded<'_> = if first & 0x80 != 0 {
                // Indexed field.
                let index = integer(block, &mut pos, 7)?;
                let (name, value) = self.entry(index)?;
                (Cow::Borrowed(name), Cow::Borrowed(value))
            } else if first & 0xc0 == 0x40 {
                // Literal with incremental indexing.
                let index = integer(block, &mut pos, 6)?;
                let (name, value) = self.literal(block, &mut pos, index)?;
                let entry = (name.into_owned(), value.into_owned());
                list = counted(list, &entry.0, &entry.1, max_list)?;
                fields.push(&entry.0, &entry.1);
                self.insert(entry);
                continue;
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update: only before the first field of a block.
                let size = integer(block, &mut pos, 5)?;
                if size > self.limit || !fields.ends.is_empty() {
                    return Err(HpackError::BadSizeUpdate);
                }
                self.max = size;
                self.evict(0);
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001).
                let index = integer(block, &mut pos, 4)?;
                self.literal(block, &mut pos, index)?
            };
            list = counted(list, &name, &value, max_list)?;
            fields.push(&name, &value);
        }
        Ok(fields.build())
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                Ok((name.as_bytes(), value.as_bytes()))
            }
            _ => self
                .table
                .get(index - 62)
                .map(|(name, value)| (name.as_slice(), value.as_slice()))
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    /// A literal field whose name is entry `index` (or, when 0, a string that follows).
    fn literal<'a>(
        &'a self,
        block: &'a [u8],
        pos: &mut usize,
        index: usize,
    ) -> Result<Decoded<'a>, HpackError> {
        let name = match index {
            0 => string(block, pos)?,
            _ => Cow::Borrowed(self.entry(index)?.0),
        };
        Ok((name, string(block, pos)?))
    }

    fn insert(&mut self, entry: Entry) {
        let size = entry.0.len() + entry.1.len() + 32;
        // An entry larger than the table empties it and is not added (RFC 7541 §4.4).
        self.evict(size);
        if size <= self.max {
            self.size += size;
            self.table.push_front(entry);
        }
    }

    /// Evicts the oldest entries until `room` more bytes fit (or the table is empty).
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((name, value)) = self.table.pop_back() else { break };
            self.size -= name.len() + value.len() + 32;
        }
    }
}

/// The list's size with one more field, as SETTINGS_MAX_HEADER_LIST_SIZE counts it.
fn counted(list: usize, name: &[u8], value: &[u8], max_list: usize) -> Result<usize, HpackError> {
    let list = list + name.len() + value.len() + 32;
    if list > max_list {
        return Err(HpackError::ListTooLarge);
    }
    Ok(list)
}

/// An integer with an `prefix`-bit prefix (RFC 7541 §5.1), at most 2^28 or so.
fn integer(block: &[u8], pos: &mut usize, prefix: u8) -> Result<usize, HpackError> {
    let mask = ((1u16 << prefix) - 1) as u8;
    let first = block.get(*pos).ok_or(HpackError::Truncated)? & mask;
    *pos += 1;
    if first < mask {
        return Ok(first as usize);
    }
    let mut value = mask as usize;
    let mut shift = 0u32;
    loop {
        let byte = *block.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
        value += ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// A string literal (RFC 7541 §5.2), Huffman-coded or not: borrowed from the block when it is
/// plain.
fn string<'a>(block: &'a [u8], pos: &mut usize) -> Result<Cow<'a, [u8]>, HpackError> {
    let huffman = block.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(block, pos, 7)?;
    let end = pos.checked_add(len).filter(|end| *end <= block.len()).ok_or(HpackError::Truncated)?;
    let raw = &block[*pos..end];
    *pos = end;
    if !huffman {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = Vec::with_capacity(len + len / 2);
    huffman::decode(raw, &mut out).map_err(|_| HpackError::InvalidHuffman)?;
    Ok(Cow::Owned(out))
}

fn put_integer(dst: &mut Vec<u8>, first: u8, prefix: u8, mut value: usize) {
    let mask = ((1u16 << prefix) - 1) as usize;
    if value < mask {
        dst.push(first | value as u8);
        return;
    }
    dst.push(first | mask as u8);
    value -= mask;
    while value >= 0x80 {
        dst.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    dst.push(value as u8);
}

/// The static table's first entry named `name` (RFC 7541 Appendix A): by length, then among
/// the few names of that length, rather than a scan of the table.
fn static_name(name: &[u8]) -> Option<usize> {
    Some(match name.len() {
        3 => match name {
            b"age" => 21,
            b"via" => 60,
            _ => return None,
        },
        4 => match name {
            b"date" => 33,
            b"etag" => 34,
            b"from" => 37,
            b"host" => 38,
            b"link" => 45,
            b"vary" => 59,
            _ => return None,
        },
        5 => match name {
            b":path" => 4,
            b"allow" => 22,
            b"range" => 50,
            _ => return None,
        },
        6 => match name {
            b"accept" => 19,
            b"cookie" => 32,
            b"expect" => 35,
            b"server" => 54,
            _ => return None,
        },
        7 => match name {
            b":method" => 2,
            b":scheme" => 6,
            b":status" => 8,
            b"expires" => 36,
            b"referer" => 51,
            b"refresh" => 52,
            _ => return None,
        },
        8 => match name {
            b"if-match" => 39,
            b"if-range" => 42,
            b"location" => 46,
            _ => return None,
        },
        10 => match name {
            b":authority" => 1,
            b"set-cookie" => 55,
            b"user-agent" => 58,
            _ => return None,
        },
        11 => match name {
            b"retry-after" => 53,
            _ => return None,
        },
        12 => match name {
            b"content-type" => 31,
            b"max-forwards" => 47,
            _ => return None,
        },
        13 => match name {
            b"accept-ranges" => 18,
            b"authorization" => 23,
            b"cache-control" => 24,
            b"content-range" => 30,
            b"if-none-match" => 41,
            b"last-modified" => 44,
            _ => return None,
        },
        14 => match name {
            b"accept-charset" => 15,
            b"content-length" => 28,
            _ => return None,
        },
        15 => match name {
            b"accept-encoding" => 16,
            b"accept-language" => 17,
            _ => return None,
        },
        16 => match name {
            b"content-encoding" => 26,
            b"content-language" => 27,
            b"content-location" => 29,
            b"www-authenticate" => 61,
            _ => return None,
        },
        17 => match name {
            b"if-modified-since" => 40,
            b"transfer-encoding" => 57,
            _ => return None,
        },
        18 => match name {
            b"proxy-authenticate" => 48,
            _ => return None,
        },
        19 => match name {
            b"content-disposition" => 25,
            b"if-unmodified-since" => 43,
            b"proxy-authorization" => 49,
            _ => return None,
        },
        25 => match name {
            b"strict-transport-security" => 56,
            _ => return None,
        },
        27 => match name {
            b"access-control-allow-origin" => 20,
            _ => return None,
        },
        _ => return None,
    })
}

/// Appends a field as a literal without indexing (RFC 7541 §6.2.2): its name by its static-table
/// index when the table has it, else spelled out. `name` must be lowercase, as HTTP/2 requires.
pub fn put_field(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    match static_name(name) {
        Some(i) => put_integer(dst, 0x00, 4, i),
        None => {
            dst.push(0x00);
            put_integer(dst, 0x00, 7, name.len());
            dst.extend_from_slice(name);
        }
    }
    put_integer(dst, 0x00, 7, value.len());
    dst.extend_from_slice(value);
}

/// A response's header block: its status and content type, touching no table.
pub fn response_head(status: u16, content_type: &str) -> Vec<u8> {
    let mut block = Vec::with_capacity(32);
    put_field(&mut block, b":status", status.to_string().as_bytes());
    put_field(&mut block, b"content-type", content_type.as_bytes());
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn text(fields: &Fields) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    /// RFC 7541 C.3 (plain literals) and C.4 (the same requests Huffman-coded): three requests
    /// on one connection, the dynamic table carried from one to the next.
    #[test]
    fn decodes_the_rfc_request_examples_with_their_dynamic_table() {
        for blocks in [
            [
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ],
            [
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
        ] {
            let mut decoder = Decoder::new(4096);
            let first = decoder.decode(&hex(blocks[0]), 16 * 1024).unwrap();
            assert_eq!(
                text(&first),
                pairs(&[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "www.example.com")
                ])
            );
            assert_eq!(decoder.size, 57);
            let second = decoder.decode(&hex(blocks[1]), 16 * 1024).unwrap();
            assert_eq!(text(&second)[4], ("cache-control".to_string(), "no-cache".to_string()));
            assert_eq!(decoder.size, 110);
            let third = decoder.decode(&hex(blocks[2]), 16 * 1024).unwrap();
            assert_eq!(
                text(&third),
                pairs(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value"),
                ])
            );
            assert_eq!(decoder.size, 164);
        }
    }

    #[test]
    fn evicts_the_oldest_entries_and_obeys_size_updates() {
        let mut decoder = Decoder::new(100);
        // Two literals with incremental indexing, new names: "a: 1" (34) and "b: 2" (34).
        let block = hex("4001 6101 31 4001 6201 32");
        decoder.decode(&block, 1024).unwrap();
        assert_eq!(decoder.size, 68);
        // A third (34) does not fit beside both: the oldest ("a") goes.
        decoder.decode(&hex("4001 6301 33"), 1024).unwrap();
        assert_eq!(text(&decoder.decode(&hex("be bf"), 1024).unwrap()), pairs(&[("c", "3"), ("b", "2")]));
        assert_eq!(decoder.decode(&hex("c0"), 1024), Err(HpackError::BadIndex(64)));
        // A size update to 0 empties the table; one above the announced limit is refused, as
        // is one after a field.
        decoder.decode(&hex("20"), 1024).unwrap();
        assert_eq!(decoder.size, 0);
        assert_eq!(decoder.decode(&hex("3f 46"), 1024), Err(HpackError::BadSizeUpdate));
        assert_eq!(decoder.decode(&hex("82 20"), 1024), Err(HpackError::BadSizeUpdate));
    }

    #[test]
    fn refuses_malformed_blocks() {
        let mut decoder = Decoder::new(4096);
        assert_eq!(decoder.decode(&hex("80"), 1024), Err(HpackError::BadIndex(0)));
        assert_eq!(decoder.decode(&hex("ff"), 1024), Err(HpackError::Truncated));
        assert_eq!(decoder.decode(&hex("ff ff ff ff ff ff 01"), 1024), Err(HpackError::IntegerOverflow));
        // A literal whose value claims 5 bytes and carries 2.
        assert_eq!(decoder.decode(&hex("0001 61 05 6869"), 1024), Err(HpackError::Truncated));
        // A Huffman value padded with zeros.
        assert_eq!(decoder.decode(&hex("0001 61 81 00"), 1024), Err(HpackError::InvalidHuffman));
        // 100 copies of ":method: GET" (42 each) are more than a list of 4,096.
        assert_eq!(decoder.decode(&[0x82; 100], 4096), Err(HpackError::ListTooLarge));
    }

    #[test]
    fn static_names_are_found_at_their_first_entry() {
        for (i, (name, _)) in STATIC_TABLE.iter().enumerate() {
            let first = STATIC_TABLE.iter().position(|(n, _)| n == name).unwrap() + 1;
            assert_eq!(static_name(name.as_bytes()), Some(first), "{name} at {}", i + 1);
        }
        assert_eq!(static_name(b"x-request-id"), None);
        assert_eq!(static_name(b"Host"), None, "names are lowercase");
    }

    #[test]
    fn any_field_encodes_to_what_the_decoder_reads_back() {
        let fields: [(&[u8], &[u8]); 5] = [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"0"),
            (b"x-long", &[b'v'; 300]),
            (b"www-authenticate", b""),
        ];
        let mut block = Vec::new();
        for (n, v) in fields {
            put_field(&mut block, n, v);
        }
        let mut decoder = Decoder::new(4096);
        let decoded = decoder.decode(&block, 16 * 1024).unwrap();
        let expected: Fields = fields.into_iter().collect();
        assert_eq!(decoded, expected);
        assert_eq!(decoder.size, 0, "nothing indexed");
        // A static name costs its index: `:status` is entry 8, one byte.
        let mut status = Vec::new();
        put_field(&mut status, b":status", b"204");
        assert_eq!(status, [0x08, 3, b'2', b'0', b'4']);
    }

    #[test]
    fn a_response_head_decodes_to_its_status_and_type() {
        let block = response_head(403, "text/plain");
        let mut decoder = Decoder::new(4096);
        assert_eq!(
            text(&decoder.decode(&block, 1024).unwrap()),
            pairs(&[(":status", "403"), ("content-type", "text/plain")])
        );
        assert_eq!(decoder.size, 0, "nothing indexed");
        let mut long = Vec::new();
        put_integer(&mut long, 0x00, 4, 300);
        assert_eq!(long, [0x0f, 0x9d, 0x02]);
    }
}
