//! Newline-delimited JSON framing for the config stream, in both directions: bytes arrive in
//! frames of any size, and complete lines come out. Each byte is looked at once (the search for
//! the next `\n` resumes where the last one stopped), so a config of N bytes costs O(N) however
//! it is split into frames; and a line longer than the limit is an error, not an ever-growing
//! buffer.

/// A line exceeded [`LineBuffer`]'s limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong {
    pub limit: usize,
}

impl std::fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a line exceeds {} bytes", self.limit)
    }
}

impl std::error::Error for LineTooLong {}

/// Collects frames and yields complete lines (without their `\n`).
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Where the unread part starts.
    start: usize,
    /// Bytes before this (and after `start`) hold no `\n`.
    scanned: usize,
    limit: usize,
}

impl LineBuffer {
    /// A buffer refusing lines longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { buf: Vec::new(), start: 0, scanned: 0, limit }
    }

    /// Appends a frame. The consumed part is dropped first when it is at least half the buffer,
    /// so moving the rest costs no more than the bytes already read.
    pub fn extend(&mut self, data: &[u8]) {
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete line, `None` when the rest is incomplete, or an error when the line
    /// (complete or not) is longer than the limit.
    pub fn next_line(&mut self) -> Result<Option<&[u8]>, LineTooLong> {
        let too_long = LineTooLong { limit: self.limit };
        match self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
            Some(i) => {
                let end = self.scanned + i;
                let line = self.start..end;
                self.start = end + 1;
                self.scanned = self.start;
                if line.len() > self.limit {
                    return Err(too_long);
                }
                Ok(Some(&self.buf[line]))
            }
            None if self.start == self.buf.len() => {
                // Everything read: the buffer goes, so a connection between lines holds none
                // (its capacity would otherwise stay at the longest line it ever carried).
                *self = Self::new(self.limit);
                Ok(None)
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() - self.start > self.limit {
                    return Err(too_long);
                }
                Ok(None)
            }
        }
    }

    /// Bytes held that are not yet a complete line.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Bytes of memory the buffer holds.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_lines(lines: &mut LineBuffer) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(l) = lines.next_line().unwrap() {
            out.push(l.to_vec());
        }
        out
    }

    #[test]
    fn lines_split_across_frames_of_any_size_come_out_whole() {
        let input = b"{\"a\":1}\n\n{\"b\":22}\nrest";
        for size in 1..input.len() {
            let mut lines = LineBuffer::new(100);
            let mut got = Vec::new();
            for frame in input.chunks(size) {
                lines.extend(frame);
                got.extend(all_lines(&mut lines));
            }
            assert_eq!(
                got,
                vec![b"{\"a\":1}".to_vec(), b"".to_vec(), b"{\"b\":22}".to_vec()],
                "frames of {size}"
            );
            assert_eq!(lines.pending(), 4);
        }
    }

    #[test]
    fn a_line_over_the_limit_is_an_error_before_its_newline_arrives() {
        let mut lines = LineBuffer::new(8);
        lines.extend(b"12345678");
        assert_eq!(lines.next_line(), Ok(None));
        lines.extend(b"9");
        assert_eq!(lines.next_line(), Err(LineTooLong { limit: 8 }));
        let mut lines = LineBuffer::new(3);
        lines.extend(b"abcd\n");
        assert_eq!(lines.next_line(), Err(LineTooLong { limit: 3 }));
    }

    #[test]
    fn a_buffer_read_to_its_end_holds_no_memory() {
        let mut lines = LineBuffer::new(1 << 20);
        lines.extend(&[b'x'; 100_000]);
        lines.extend(b"\nshort");
        assert_eq!(lines.next_line().unwrap().map(<[u8]>::len), Some(100_000));
        assert_eq!(lines.next_line(), Ok(None));
        assert!(lines.capacity() >= 100_000, "a partial line keeps its buffer");
        lines.extend(b"\n");
        assert_eq!(lines.next_line(), Ok(Some(&b"short"[..])));
        assert_eq!(lines.next_line(), Ok(None));
        assert_eq!((lines.capacity(), lines.pending()), (0, 0));
    }

    #[test]
    fn each_byte_is_scanned_once_for_a_line_sent_a_byte_at_a_time() {
        // 1 MiB in one-byte frames: with a rescan per frame this is 2^39 steps, here 2^20.
        let mut lines = LineBuffer::new(2 << 20);
        for _ in 0..(1 << 20) {
            lines.extend(b"x");
            assert_eq!(lines.next_line(), Ok(None));
        }
        lines.extend(b"\n");
        assert_eq!(lines.next_line().unwrap().map(<[u8]>::len), Some(1 << 20));
        assert_eq!(lines.pending(), 0);
    }
}
