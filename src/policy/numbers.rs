//! Do-not-call lists as compact sets of numbers.
//!
//! A list file holds one E.164 number a line (`#` starts a comment). An E.164 number is at most
//! 15 digits with no leading zero, so it is one `u64`, and the digits name it exactly. A set keeps
//! the numbers sorted in buckets of equal width over the list's range: an index of bucket starts
//! (`u32` each) and, per number, its offset within its bucket (`u32`: there are always enough
//! buckets for each to be narrower than 2^32). Ten million numbers take about 50 MB (against
//! about 1 GB as a `HashSet<String>`), and a look-up computes its bucket and searches the few
//! numbers in it: about the same cost at ten thousand numbers as at ten million.
//!
//! Loading streams the file three times (range, bucket sizes, numbers), in 1 MiB chunks split on
//! newlines in place, and never holds its text, so the peak is the set itself plus one bucket
//! cursor per bucket. Syntax only is checked
//! (a `+`, then 8 to 15 digits, the first not 0): a list names numbers to avoid, and a number
//! that is not valid in its plan can never be called anyway.

use std::io::Read;
use std::path::Path;

/// Buckets are at most this many (`2^22`: a 16 MB index).
const MAX_BUCKETS: u64 = 1 << 22;
/// Numbers per bucket aimed at.
const PER_BUCKET: u64 = 4;
/// Lists up to this size are one sorted array.
const SMALL: usize = 1024;

/// A set of E.164 numbers. See the module docs.
#[derive(Clone, Default)]
pub struct NumberSet {
    repr: Repr,
}

#[derive(Clone)]
enum Repr {
    Small(Vec<u64>),
    Bucketed {
        min: u64,
        /// Width of a bucket, in numbers; at most `u32::MAX`.
        width: u64,
        /// `starts[b]..starts[b + 1]` is bucket `b` in `offsets`.
        starts: Vec<u32>,
        /// Each number minus its bucket's first value, sorted within the bucket.
        offsets: Vec<u32>,
    },
}

impl Default for Repr {
    fn default() -> Self {
        Repr::Small(Vec::new())
    }
}

impl std::fmt::Debug for NumberSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NumberSet({} numbers)", self.len())
    }
}

/// Why a list could not be loaded: the line (1-based) if one is at fault, and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListError {
    pub line: Option<usize>,
    pub reason: String,
}

impl ListError {
    fn io(e: std::io::Error) -> Self {
        ListError {
            line: None,
            reason: format!("cannot read list: {e}"),
        }
    }

    fn changed() -> Self {
        ListError {
            line: None,
            reason: "the list changed while it was loaded; load it again".into(),
        }
    }
}

/// An E.164 number as its integer, if its syntax is E.164 (`+`, 8 to 15 digits, no leading 0).
pub fn e164_value(s: &str) -> Option<u64> {
    digits_value(s.as_bytes())
}

fn digits_value(s: &[u8]) -> Option<u64> {
    let digits = s.strip_prefix(b"+")?;
    if !(8..=15).contains(&digits.len()) || digits[0] == b'0' {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// The entry of a list line, without its comment and surrounding blanks; `None` if none.
fn entry(line: &[u8]) -> Option<&[u8]> {
    let line = match line.iter().position(|&b| b == b'#') {
        Some(hash) => &line[..hash],
        None => line,
    };
    let line = line.trim_ascii();
    (!line.is_empty()).then_some(line)
}

/// Bytes read from a list file at a time.
const CHUNK: usize = 1 << 20;

/// Read every number of a list, in order, calling `f` with each. The file is read in chunks
/// and split on newlines in place: no allocation per line.
fn each_number(reader: impl Read, f: impl FnMut(u64)) -> Result<(), ListError> {
    each_number_chunked(reader, CHUNK, f)
}

fn each_number_chunked(
    mut reader: impl Read,
    chunk: usize,
    mut f: impl FnMut(u64),
) -> Result<(), ListError> {
    let mut buf = vec![0u8; chunk];
    let mut filled = 0;
    let mut line_no = 0;
    loop {
        let n = loop {
            match reader.read(&mut buf[filled..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other.map_err(ListError::io)?,
            }
        };
        filled += n;
        let eof = n == 0;
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &buf[..filled]) {
            line_no += 1;
            number_line(&buf[start..end], line_no, &mut f)?;
            start = end + 1;
        }
        if eof {
            if start < filled {
                line_no += 1;
                number_line(&buf[start..filled], line_no, &mut f)?;
            }
            return Ok(());
        }
        if start == 0 && filled == buf.len() {
            return Err(ListError {
                line: Some(line_no + 1),
                reason: format!("a line longer than {chunk} bytes"),
            });
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
    }
}

/// One line of a list: its number passed to `f`, nothing for a blank or comment line.
fn number_line(line: &[u8], line_no: usize, f: &mut impl FnMut(u64)) -> Result<(), ListError> {
    // The common line, `+<digits>`, parses without looking for a comment first.
    if let Some(n) = digits_value(line) {
        f(n);
        return Ok(());
    }
    let Some(entry) = entry(line) else {
        return Ok(());
    };
    match digits_value(entry) {
        Some(n) => {
            f(n);
            Ok(())
        }
        None => Err(ListError {
            line: Some(line_no),
            reason: format!(
                "{:?} is not an E.164 number",
                String::from_utf8_lossy(entry)
            ),
        }),
    }
}

impl NumberSet {
    /// A set of these numbers.
    pub fn from_numbers(numbers: impl IntoIterator<Item = u64>) -> NumberSet {
        let mut all: Vec<u64> = numbers.into_iter().collect();
        all.sort_unstable();
        all.dedup();
        if all.len() <= SMALL {
            return NumberSet {
                repr: Repr::Small(all),
            };
        }
        let (min, max) = (all[0], all[all.len() - 1]);
        let mut builder = Builder::new(min, max, all.len() as u64);
        for &n in &all {
            builder.count(n);
        }
        builder.start_filling();
        for &n in &all {
            builder.fill(n);
        }
        builder.finish()
    }

    /// Load a list file, streaming it (see the module docs).
    pub fn load(path: &Path) -> Result<NumberSet, ListError> {
        let open = || std::fs::File::open(path).map_err(ListError::io);
        // 1: range and count (and every line's syntax).
        let (mut min, mut max, mut count) = (u64::MAX, 0u64, 0u64);
        each_number(open()?, |n| {
            min = min.min(n);
            max = max.max(n);
            count += 1;
        })?;
        if count <= SMALL as u64 {
            let mut all = Vec::with_capacity(count as usize);
            each_number(open()?, |n| all.push(n))?;
            return Ok(NumberSet::from_numbers(all));
        }
        // 2: bucket sizes.
        let mut builder = Builder::new(min, max, count);
        let mut seen = 0u64;
        let mut changed = false;
        each_number(open()?, |n| {
            seen += 1;
            if n < min || n > max || seen > count {
                changed = true;
            } else {
                builder.count(n);
            }
        })?;
        if changed || seen != count {
            return Err(ListError::changed());
        }
        // 3: the numbers.
        builder.start_filling();
        seen = 0;
        each_number(open()?, |n| {
            seen += 1;
            if n < min || n > max || !builder.fill(n) {
                changed = true;
            }
        })?;
        if changed || seen != count {
            return Err(ListError::changed());
        }
        Ok(builder.finish())
    }

    /// How many numbers the set holds.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Small(all) => all.len(),
            Repr::Bucketed { offsets, .. } => offsets.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the set holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::Small(all) => all.capacity() * 8,
            Repr::Bucketed {
                starts, offsets, ..
            } => (starts.capacity() + offsets.capacity()) * 4,
        }
    }

    /// Whether the set holds this number.
    pub fn contains(&self, n: u64) -> bool {
        match &self.repr {
            Repr::Small(all) => all.binary_search(&n).is_ok(),
            Repr::Bucketed {
                min,
                width,
                starts,
                offsets,
            } => {
                let Some(rel) = n.checked_sub(*min) else {
                    return false;
                };
                let bucket = (rel / width) as usize;
                if bucket + 1 >= starts.len() {
                    return false;
                }
                let offset = (rel % width) as u32;
                let (from, to) = (starts[bucket] as usize, starts[bucket + 1] as usize);
                offsets[from..to].binary_search(&offset).is_ok()
            }
        }
    }

    /// Whether the set holds this E.164 number.
    pub fn contains_e164(&self, e164: &str) -> bool {
        e164_value(e164).is_some_and(|n| self.contains(n))
    }
}

/// Builds a bucketed set in two passes over the numbers: count, then fill.
struct Builder {
    min: u64,
    width: u64,
    /// Pass 1: each bucket's size. Pass 2: each bucket's next free place.
    cursors: Vec<u32>,
    starts: Vec<u32>,
    offsets: Vec<u32>,
}

impl Builder {
    fn new(min: u64, max: u64, count: u64) -> Builder {
        let span = max - min + 1;
        // Enough buckets for a few numbers each, and for every offset to fit in a u32.
        let wanted = (count / PER_BUCKET).clamp(1, MAX_BUCKETS);
        let buckets = wanted.max(span.div_ceil(u64::from(u32::MAX)));
        let width = span.div_ceil(buckets);
        let buckets = span.div_ceil(width);
        Builder {
            min,
            width,
            cursors: vec![0; buckets as usize],
            starts: Vec::new(),
            offsets: Vec::new(),
        }
    }

    fn bucket(&self, n: u64) -> (usize, u32) {
        let rel = n - self.min;
        ((rel / self.width) as usize, (rel % self.width) as u32)
    }

    fn count(&mut self, n: u64) {
        let (b, _) = self.bucket(n);
        self.cursors[b] += 1;
    }

    fn start_filling(&mut self) {
        let mut starts = Vec::with_capacity(self.cursors.len() + 1);
        let mut at = 0u32;
        for size in self.cursors.iter_mut() {
            starts.push(at);
            let next = at + *size;
            *size = at;
            at = next;
        }
        starts.push(at);
        self.offsets = vec![0; at as usize];
        self.starts = starts;
    }

    /// Place a number; `false` if its bucket is already full (the input changed).
    fn fill(&mut self, n: u64) -> bool {
        let (b, offset) = self.bucket(n);
        let at = self.cursors[b];
        if at >= self.starts[b + 1] {
            return false;
        }
        self.offsets[at as usize] = offset;
        self.cursors[b] += 1;
        true
    }

    /// Sort each bucket and drop repeated numbers.
    fn finish(mut self) -> NumberSet {
        drop(std::mem::take(&mut self.cursors));
        let mut write = 0usize;
        for b in 0..self.starts.len() - 1 {
            let (from, to) = (self.starts[b] as usize, self.starts[b + 1] as usize);
            self.starts[b] = write as u32;
            let bucket = &mut self.offsets[from..to];
            bucket.sort_unstable();
            let mut last = None;
            for i in from..to {
                let v = self.offsets[i];
                if last != Some(v) {
                    self.offsets[write] = v;
                    write += 1;
                    last = Some(v);
                }
            }
        }
        let end = self.starts.len() - 1;
        self.starts[end] = write as u32;
        self.offsets.truncate(write);
        self.offsets.shrink_to_fit();
        NumberSet {
            repr: Repr::Bucketed {
                min: self.min,
                width: self.width,
                starts: self.starts,
                offsets: self.offsets,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn syntax_is_e164() {
        assert_eq!(e164_value("+14155550100"), Some(14_155_550_100));
        assert_eq!(e164_value("+999999999999999"), Some(999_999_999_999_999));
        for bad in [
            "",
            "+",
            "14155550100",
            "+0415555010",
            "+1415555",
            "+1415555010a",
            "+1234567890123456",
        ] {
            assert_eq!(e164_value(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_file_loads_with_comments_blanks_and_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dnc.txt");
        std::fs::write(
            &path,
            "# shared list\n+14155550100\n\n  +14155550101  # from a call\n+14155550100\n",
        )
        .unwrap();
        let set = NumberSet::load(&path).unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.contains_e164("+14155550101"));
        assert!(!set.contains_e164("+14155550102"));
        std::fs::write(&path, "+14155550100\n+1415\n").unwrap();
        let e = NumberSet::load(&path).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.reason.contains("+1415"), "{e:?}");
    }

    #[test]
    fn lines_split_across_chunks_crlf_and_no_final_newline_are_read() {
        let text = "# list\r\n+14155550100\r\n+14155550101 # x\n\n+447911123456";
        for chunk in [18, 19, 23, 64, 1 << 20] {
            let mut seen = Vec::new();
            each_number_chunked(text.as_bytes(), chunk, |n| seen.push(n)).unwrap();
            assert_eq!(
                seen,
                [14_155_550_100, 14_155_550_101, 447_911_123_456],
                "{chunk}"
            );
        }
        let long = format!("+14155550100\n{}\n", "#".repeat(40));
        let e = each_number_chunked(long.as_bytes(), 16, |_| {}).unwrap_err();
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn a_large_file_streams_into_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dnc.txt");
        let numbers: Vec<u64> = (0..50_000u64)
            .map(|i| 12_000_000_000 + i * 7_919 * 13)
            .collect();
        let mut text = String::new();
        for n in numbers.iter().rev() {
            text.push_str(&format!("+{n}\n"));
        }
        text.push_str("+447911123456\n+12000000000\n");
        std::fs::write(&path, text).unwrap();
        let set = NumberSet::load(&path).unwrap();
        assert!(matches!(set.repr, Repr::Bucketed { .. }));
        assert_eq!(set.len(), numbers.len() + 1);
        for n in &numbers {
            assert!(set.contains(*n));
            assert!(!set.contains(n + 1));
        }
        assert!(set.contains_e164("+447911123456"));
        assert!(!set.contains_e164("+447911123457"));
        assert!(!set.contains(1));
        assert!(!set.contains(u64::MAX));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The set holds exactly the numbers it was made of, whatever their spread.
        #[test]
        fn membership_is_exact(
            numbers in prop::collection::vec(10_000_000u64..1_000_000_000_000_000, 0..3000),
            probes in prop::collection::vec(10_000_000u64..1_000_000_000_000_000, 0..200),
        ) {
            let set = NumberSet::from_numbers(numbers.iter().copied());
            let truth: std::collections::HashSet<u64> = numbers.iter().copied().collect();
            prop_assert_eq!(set.len(), truth.len());
            for n in numbers.iter().chain(&probes) {
                prop_assert_eq!(set.contains(*n), truth.contains(n), "{}", n);
                prop_assert_eq!(set.contains(*n + 1), truth.contains(&(*n + 1)));
            }
        }
    }
}
