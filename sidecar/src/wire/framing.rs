//! How a message body ends: by `Content-Length`, by chunked coding (scanned as it streams by,
//! never re-encoded) or at close.

/// Bytes that are not valid chunked coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChunk;

/// Scans chunked transfer coding (RFC 9112 §7.1) as it streams by, to find where the message
/// ends; the bytes themselves are forwarded unchanged, so the scan is strict about what the
/// next reader could take differently: every line ends in CRLF (a bare LF is an error, also
/// inside an extension), a size is hex digits that fit in 64 bits, an extension follows only
/// optional whitespace and `;` and holds no control bytes, and trailer lines hold none either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    Size {
        value: u64,
        digits: bool,
    },
    /// Whitespace after the size: only `;` or CR may follow.
    SizeSpace {
        value: u64,
    },
    Ext {
        value: u64,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    LineStart,
    Line,
    LineLf,
    FinalLf,
    Done,
}

impl Default for Chunked {
    fn default() -> Self {
        Self::Size { value: 0, digits: false }
    }
}

/// Bytes a line may hold: visible ASCII, space, tab and obs-text; no other control byte.
fn line_byte(b: u8) -> bool {
    b == b'\t' || b >= 0x20 && b != 0x7f
}

impl Chunked {
    /// Feeds bytes; returns how many belong to the message (all of them unless it ended), or
    /// `Err` for bytes that are not chunked coding.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, BadChunk> {
        let mut i = 0;
        while i < bytes.len() {
            if *self == Self::Done {
                return Ok(i);
            }
            let b = bytes[i];
            *self = match *self {
                Self::Size { value, digits } => match b {
                    b'\r' if digits => Self::SizeLf { value },
                    b';' if digits => Self::Ext { value },
                    b' ' | b'\t' if digits => Self::SizeSpace { value },
                    _ => {
                        let d = (b as char).to_digit(16).ok_or(BadChunk)?;
                        let value = value
                            .checked_mul(16)
                            .and_then(|v| v.checked_add(u64::from(d)))
                            .ok_or(BadChunk)?;
                        Self::Size { value, digits: true }
                    }
                },
                Self::SizeSpace { value } => match b {
                    b' ' | b'\t' => Self::SizeSpace { value },
                    b';' => Self::Ext { value },
                    b'\r' => Self::SizeLf { value },
                    _ => return Err(BadChunk),
                },
                Self::Ext { value } => match b {
                    b'\r' => Self::SizeLf { value },
                    _ if line_byte(b) => Self::Ext { value },
                    _ => return Err(BadChunk),
                },
                Self::SizeLf { value } if b == b'\n' => {
                    if value == 0 {
                        Self::LineStart
                    } else {
                        Self::Data(value)
                    }
                }
                Self::Data(n) => {
                    let take = (bytes.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    *self = if left == 0 { Self::DataCr } else { Self::Data(left) };
                    continue;
                }
                Self::DataCr if b == b'\r' => Self::DataLf,
                Self::DataLf if b == b'\n' => Self::default(),
                Self::LineStart if b == b'\r' => Self::FinalLf,
                Self::LineStart | Self::Line if line_byte(b) => Self::Line,
                Self::Line if b == b'\r' => Self::LineLf,
                Self::LineLf if b == b'\n' => Self::LineStart,
                Self::FinalLf if b == b'\n' => {
                    *self = Self::Done;
                    return Ok(i + 1);
                }
                _ => return Err(BadChunk),
            };
            i += 1;
        }
        Ok(i)
    }
}

impl Chunked {
    /// Like [`Chunked::feed`], decoding as it goes: the ranges of `bytes` that are chunk data
    /// are pushed to `data`, and the bytes of the trailer section (its fields and the empty
    /// line that ends it) to `trailer`.
    pub fn decode(
        &mut self,
        bytes: &[u8],
        data: &mut Vec<std::ops::Range<usize>>,
        trailer: &mut Vec<u8>,
    ) -> Result<usize, BadChunk> {
        let mut i = 0;
        while i < bytes.len() && *self != Self::Done {
            if let Self::Data(n) = *self {
                let take = (bytes.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                data.push(i..i + take);
                self.feed(&bytes[i..i + take])?;
                i += take;
                continue;
            }
            let in_trailer = matches!(*self, Self::LineStart | Self::Line | Self::LineLf | Self::FinalLf);
            i += self.feed(&bytes[i..=i])?;
            if in_trailer {
                trailer.push(bytes[i - 1]);
            }
        }
        Ok(i)
    }
}

/// How a response body ends.
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// Consumes body bytes from `rest` according to `framing`; true when the body is complete.
pub(crate) fn take_body(framing: &mut Framing, rest: &mut &[u8]) -> Result<bool, BadChunk> {
    match framing {
        Framing::None => Ok(true),
        Framing::Length(n) => {
            let take = rest.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
            *n -= take as u64;
            *rest = &rest[take..];
            Ok(*n == 0)
        }
        Framing::Chunked(scanner) => {
            let used = scanner.feed(rest)?;
            *rest = &rest[used..];
            Ok(*scanner == Chunked::Done)
        }
        Framing::UntilClose => {
            *rest = &rest[rest.len()..];
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_scanner_finds_the_end() {
        let body =
            b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for split in 0..=body.len() - 4 {
            let mut s = Chunked::default();
            let first = s.feed(&body[..split]).unwrap();
            assert_eq!(first, split, "nothing ends early");
            let second = s.feed(&body[split..]).unwrap();
            assert_eq!(split + second, body.len() - 4, "split at {split}");
            assert_eq!(s, Chunked::Done);
        }
        let mut s = Chunked::default();
        assert!(s.feed(b"zz\r\n").is_err());
    }

    #[test]
    fn chunked_decoding_yields_the_data_and_the_trailer_section() {
        let body =
            b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for split in 0..=body.len() - 4 {
            let mut s = Chunked::default();
            let (mut data, mut trailer) = (Vec::new(), Vec::new());
            let mut ranges = Vec::new();
            let first = s.decode(&body[..split], &mut ranges, &mut trailer).unwrap();
            data.extend(ranges.drain(..).flat_map(|r| body[r].to_vec()));
            let second = s.decode(&body[split..], &mut ranges, &mut trailer).unwrap();
            data.extend(ranges.drain(..).flat_map(|r| body[split..][r].to_vec()));
            assert_eq!((first, first + second), (split, body.len() - 4), "split at {split}");
            assert_eq!(data, b"Wikipedia in\r\n\r\nchunks.", "split at {split}");
            assert_eq!(trailer, b"x-trailer: 1\r\n\r\n", "split at {split}");
            assert_eq!(s, Chunked::Done);
        }
        let mut s = Chunked::default();
        let (mut ranges, mut trailer) = (Vec::new(), Vec::new());
        assert_eq!(s.decode(b"0\r\n\r\n", &mut ranges, &mut trailer), Ok(5));
        assert!(ranges.is_empty());
        assert_eq!(trailer, b"\r\n");
        assert!(Chunked::default().decode(b"5\nhello", &mut ranges, &mut trailer).is_err());
    }

    #[test]
    fn chunked_scanner_refuses_what_a_peer_could_read_differently() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],    // bare LF after the size
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",  // bare LF inside an extension
            b"5 x\r\nhello\r\n0\r\n\r\n",     // junk after the size
            b"5;a\x00\r\nhello\r\n0\r\n\r\n", // NUL in an extension
            b"5\r\nhello\n0\r\n\r\n",         // bare LF after the data
            b"5\r\nhelloX0\r\n\r\n",          // data longer than its size
            b"0\r\nx: 1\n\r\n",               // bare LF ending a trailer
            b"0\r\n\n",                       // bare LF ending the message
            b"-5\r\nhello\r\n0\r\n\r\n",      // a sign
            b"0x5\r\nhello\r\n0\r\n\r\n",     // a prefix
            b";\r\n",                         // an extension without a size
            b"10000000000000000\r\n",         // 17 hex digits: past 64 bits
        ] {
            let mut s = Chunked::default();
            assert!(s.feed(bad).is_err(), "{}", String::from_utf8_lossy(bad).escape_debug());
        }
        let mut s = Chunked::default();
        assert_eq!(s.feed(b"5 ; a=\"b c\"\r\nhello\r\n0\r\n\r\n"), Ok(25));
        assert_eq!(s, Chunked::Done);
    }
}
