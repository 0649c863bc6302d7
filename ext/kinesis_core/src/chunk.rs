//! Turns a fluentd buffer chunk (concatenated MessagePack `[time, record]` events, fluentd's
//! standard chunk format) into user records: inject, format (json, single_value, msgpack or a
//! record field), chomp, compress, and pick partition and explicit hash keys from fields.
//!
//! Anything this fast path cannot render exactly as fluentd's Ruby formatter would (a value
//! Ruby would print with `inspect`, a time format directive it does not know...) is reported as
//! [`FormatError::NeedsRuby`], and the plugin formats that chunk with fluentd's own formatter
//! instead, so output is always what the user configured.
//!
//! Strings that are not valid UTF-8 (in_tail passes such lines through) never leave as JSON:
//! each invalid sequence becomes U+FFFD exactly as Ruby's `String#scrub` does, or the record is
//! refused ([`InvalidUtf8`]). Raw output (`single_value`, `data_key`, `msgpack`) keeps the bytes.

use std::io::Write;

use chrono::format::Item;
use chrono::{DateTime, FixedOffset, Local, TimeZone, Utc};

use crate::batch::RecordBatch;
use crate::hashkey::{parse_explicit_hash_key, validate_partition_key};
use crate::msgpack::{Head, MsgpackError, Reader};
use crate::msgpack_write::{pack_container, pack_int, pack_str, pack_uint};

/// How a record becomes bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataFormat {
    /// fluentd's `json` formatter.
    Json { add_newline: bool },
    /// fluentd's `single_value` formatter: `record[message_key].to_s`.
    SingleValue {
        message_key: String,
        add_newline: bool,
    },
    /// fluentd's `msgpack` formatter.
    Msgpack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zlib,
    Gzip,
}

/// Where injected times are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeZoneSpec {
    Local,
    Utc,
    /// Seconds east of UTC.
    Fixed(i32),
}

#[derive(Debug, Clone)]
pub enum TimeType {
    String {
        items: Vec<Item<'static>>,
        zone: TimeZoneSpec,
    },
    Unixtime,
    UnixtimeMillis,
    UnixtimeMicros,
    UnixtimeNanos,
    /// Seconds as a float, truncated to microseconds (fluentd: `time.to_r.truncate(6).to_f`).
    Float,
}

/// fluentd's `<inject>` section, in the order fluentd applies it.
#[derive(Debug, Clone, Default)]
pub struct Inject {
    pub hostname: Option<(String, String)>,
    pub worker_id: Option<(String, i64)>,
    pub tag_key: Option<String>,
    pub time: Option<(String, TimeType)>,
}

impl Inject {
    fn is_empty(&self) -> bool {
        self.hostname.is_none()
            && self.worker_id.is_none()
            && self.tag_key.is_none()
            && self.time.is_none()
    }

    fn keys(&self) -> impl Iterator<Item = &str> {
        self.hostname
            .iter()
            .map(|h| h.0.as_str())
            .chain(self.worker_id.iter().map(|w| w.0.as_str()))
            .chain(self.tag_key.iter().map(String::as_str))
            .chain(self.time.iter().map(|t| t.0.as_str()))
    }
}

/// What the JSON format does with a string (value or key) that is not valid UTF-8.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InvalidUtf8 {
    /// Replace each invalid sequence with U+FFFD, byte for byte as Ruby's `String#scrub` does
    /// (Unicode's "maximal subpart" rule, which `String::from_utf8_lossy` follows too).
    #[default]
    Replace,
    /// Refuse the record (it goes to fluentd's error stream); plugin option value `error`.
    Refuse,
}

/// Everything the plugin's configuration says about turning events into user records.
#[derive(Debug, Clone)]
pub struct FormatSpec {
    pub format: DataFormat,
    /// fluent-plugin-kinesis' `data_key`: send `record[data_key].to_s` instead of formatting.
    pub data_key: Option<String>,
    pub chomp_record: bool,
    /// Firehose's `append_new_line`: strip one trailing newline (as Ruby's `chomp`), then add
    /// "\n", before compression, so records concatenated at the destination stay lines.
    pub append_newline: bool,
    pub compression: Compression,
    pub inject: Inject,
    pub partition_key_field: Option<String>,
    pub explicit_hash_key_field: Option<String>,
    /// Formatted (and compressed) data larger than this is refused.
    pub max_data_bytes: usize,
    /// Strings that are not valid UTF-8 in the JSON format (raw formats keep the bytes).
    pub invalid_utf8: InvalidUtf8,
}

/// Why a chunk cannot take the fast path, or cannot be read at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("buffer chunk is not valid fluentd MessagePack: {0}")]
    Corrupt(#[from] MsgpackError),
    #[error("{0}")]
    NeedsRuby(String),
}

/// The user records of a chunk.
#[derive(Debug, Default)]
pub struct FormattedChunk {
    pub batch: RecordBatch,
    /// The chunk event each batch record came from.
    pub events: Vec<u32>,
    /// Events that can never be sent, and why (for fluentd's error stream).
    pub refused: Vec<(u32, String)>,
    /// Events in the chunk, skipped ones included.
    pub event_count: u32,
    /// Batch records whose JSON had invalid UTF-8 replaced with U+FFFD.
    pub scrubbed: u32,
}

/// Translates a Ruby `strftime` format into chrono items; `None` if it uses a directive whose
/// output could differ from Ruby's.
pub fn ruby_time_format(format: &str) -> Option<Vec<Item<'static>>> {
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut flag = String::new();
        while let Some(&f) = chars.peek() {
            if f == '-' || f == ':' || f.is_ascii_digit() {
                flag.push(f);
                chars.next();
            } else {
                break;
            }
        }
        let d = chars.next()?;
        let translated = match (flag.as_str(), d) {
            (
                "",
                'Y' | 'm' | 'd' | 'H' | 'M' | 'S' | 'j' | 'y' | 'b' | 'a' | 'B' | 'A' | 'p' | 'I'
                | 's' | 'T' | 'F' | 'D' | 'R' | 'e' | 'z' | '%',
            ) => format!("%{d}"),
            ("-", 'm' | 'd' | 'H' | 'M' | 'S' | 'I' | 'e') => format!("%-{d}"),
            (":", 'z') => "%:z".to_string(),
            ("", 'L') | ("3", 'N') => "%3f".to_string(),
            ("6", 'N') => "%6f".to_string(),
            ("", 'N') | ("9", 'N') => "%9f".to_string(),
            _ => return None,
        };
        out.push_str(&translated);
    }
    let items = chrono::format::StrftimeItems::new(&out)
        .parse_to_owned()
        .ok()?;
    Some(items)
}

fn format_time(
    out: &mut Vec<u8>,
    sec: i64,
    nsec: u32,
    items: &[Item<'static>],
    zone: TimeZoneSpec,
) -> Result<(), FormatError> {
    let utc = DateTime::<Utc>::from_timestamp(sec, nsec)
        .ok_or_else(|| FormatError::NeedsRuby(format!("event time {sec} is out of range")))?;
    let r = match zone {
        TimeZoneSpec::Utc => write!(out, "{}", utc.format_with_items(items.iter())),
        TimeZoneSpec::Local => write!(
            out,
            "{}",
            utc.with_timezone(&Local).format_with_items(items.iter())
        ),
        TimeZoneSpec::Fixed(secs) => {
            let tz = FixedOffset::east_opt(secs)
                .ok_or_else(|| FormatError::NeedsRuby("time zone offset out of range".into()))?;
            write!(
                out,
                "{}",
                tz.from_utc_datetime(&utc.naive_utc())
                    .format_with_items(items.iter())
            )
        }
    };
    r.map_err(|_| FormatError::NeedsRuby("time could not be formatted".into()))
}

fn needs_ruby(what: impl Into<String>) -> FormatError {
    FormatError::NeedsRuby(what.into())
}

/// Where a string sits in a record, for the reason a record is refused.
#[derive(Clone, Copy)]
enum Site {
    /// A top-level key.
    Name,
    /// The value of a top-level key.
    Value,
    /// A key or string inside an array or map value.
    Nested,
}

/// One record's invalid UTF-8 handling in the JSON writer.
struct Utf8State<'a> {
    mode: InvalidUtf8,
    /// The top-level key being written (names the field in a refusal).
    field: &'a [u8],
    /// A replacement was made in this record.
    scrubbed: bool,
    /// With [`InvalidUtf8::Refuse`]: why the record is refused (its first invalid string).
    refusal: Option<String>,
}

impl Utf8State<'_> {
    fn new(mode: InvalidUtf8) -> Self {
        Utf8State {
            mode,
            field: b"",
            scrubbed: false,
            refusal: None,
        }
    }

    fn refuse(&mut self, bytes: &[u8], offset: usize, site: Site) {
        if self.refusal.is_some() {
            return;
        }
        let name = |b: &[u8]| {
            let mut n = String::from_utf8_lossy(b).into_owned();
            if n.len() > 100 {
                let mut cut = 100;
                while !n.is_char_boundary(cut) {
                    cut -= 1;
                }
                n.truncate(cut);
                n.push_str("...");
            }
            n
        };
        let byte = bytes[offset];
        let place = match site {
            Site::Name => format!(
                "in a field name ({:?}: byte 0x{byte:02x} at offset {offset})",
                name(bytes)
            ),
            Site::Value => format!(
                "in field {:?} (byte 0x{byte:02x} at offset {offset})",
                name(self.field)
            ),
            Site::Nested => format!(
                "in field {:?} (a string nested in it: byte 0x{byte:02x} at offset {offset})",
                name(self.field)
            ),
        };
        self.refusal = Some(format!(
            "record has invalid UTF-8 {place}; sent to the error stream because invalid_utf8 is error"
        ));
    }
}

/// Appends `bytes` as a JSON string, escaping and checking UTF-8 in one pass: ASCII runs (the
/// norm) are copied whole, and the rest of the string is validated at its first non-ASCII byte.
/// Invalid UTF-8: see [`json_invalid_utf8`].
#[inline]
fn json_text(out: &mut Vec<u8>, bytes: &[u8], st: &mut Utf8State, site: Site) {
    let mark = out.len();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if escape_into::<true>(out, bytes) {
        out.push(b'"');
    } else {
        out.truncate(mark);
        let first_invalid = std::str::from_utf8(bytes)
            .err()
            .map_or(0, |e| e.valid_up_to());
        json_invalid_utf8(out, bytes, first_invalid, st, site);
    }
}

/// Appends `bytes`, not valid UTF-8, as a JSON string with each invalid sequence replaced by
/// U+FFFD: Ruby's `String#scrub`, byte for byte (both follow Unicode's "maximal subpart" rule,
/// as `Utf8Chunks` does). With [`InvalidUtf8::Refuse`] the record is marked refused instead.
#[cold]
#[inline(never)]
fn json_invalid_utf8(
    out: &mut Vec<u8>,
    bytes: &[u8],
    first_invalid: usize,
    st: &mut Utf8State,
    site: Site,
) {
    if st.mode == InvalidUtf8::Refuse {
        st.refuse(bytes, first_invalid, site);
    }
    st.scrubbed = true;
    out.push(b'"');
    for chunk in bytes.utf8_chunks() {
        json_escape(out, chunk.valid().as_bytes());
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{FFFD}".as_bytes());
        }
    }
    out.push(b'"');
}

/// Appends `s` as a JSON string, escaping as fluentd's JSON encoders do.
pub(crate) fn json_string(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    json_escape(out, s.as_bytes());
    out.push(b'"');
}

/// Appends UTF-8 `bytes` escaped for a JSON string, as fluentd's JSON encoders do.
fn json_escape(out: &mut Vec<u8>, bytes: &[u8]) {
    escape_into::<false>(out, bytes);
}

/// What a byte needs in a JSON string: copied (0), escaped (1: `"`, `\`, control characters),
/// or, for the UTF-8 check, it is not ASCII (2).
const BYTE_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = if b < 0x20 || b == b'"' as usize || b == b'\\' as usize {
            1
        } else if b >= 0x80 {
            2
        } else {
            0
        };
        b += 1;
    }
    t
};

const LOW_BITS: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the eight bytes of `w` is a control character, `"` or `\` (or, with
/// `NON_ASCII`, not ASCII). Exact for the word as a whole: each term's high bit is set in some
/// byte exactly when some byte has that property.
#[inline(always)]
fn word_needs_care<const NON_ASCII: bool>(w: u64) -> bool {
    let control = w.wrapping_sub(LOW_BITS * 0x20) & !w;
    let q = w ^ (LOW_BITS * u64::from(b'"'));
    let quote = q.wrapping_sub(LOW_BITS) & !q;
    let b = w ^ (LOW_BITS * u64::from(b'\\'));
    let backslash = b.wrapping_sub(LOW_BITS) & !b;
    let mut m = control | quote | backslash;
    if NON_ASCII {
        m |= w;
    }
    m & HIGH_BITS != 0
}

/// Appends `bytes` escaped for a JSON string, copying runs that need no escape in one piece.
/// With `CHECK_UTF8`, returns false (having written part of them) when `bytes` are not valid
/// UTF-8; without, `bytes` must be valid UTF-8 and it returns true.
#[inline]
fn escape_into<const CHECK_UTF8: bool>(out: &mut Vec<u8>, bytes: &[u8]) -> bool {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = bytes.len();
    let mut start = 0;
    let mut i = 0;
    loop {
        while i + 8 <= n {
            let w = u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
            if word_needs_care::<CHECK_UTF8>(w) {
                break;
            }
            i += 8;
        }
        let b = loop {
            if i == n {
                out.extend_from_slice(&bytes[start..]);
                return true;
            }
            let b = bytes[i];
            match BYTE_CLASS[usize::from(b)] {
                1 => break b,
                2 if CHECK_UTF8 => break b,
                _ => i += 1,
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        if CHECK_UTF8 && b >= 0x80 {
            // Everything before is ASCII: the string is valid exactly when the rest is.
            if std::str::from_utf8(&bytes[i..]).is_err() {
                return false;
            }
            return escape_into::<false>(out, &bytes[i..]);
        }
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            _ => &[],
        };
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        i += 1;
        start = i;
    }
}

/// Appends an integer in decimal, as `Display` writes it (without the formatting machinery).
#[inline]
fn decimal(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn json_f64(out: &mut Vec<u8>, v: f64) -> Result<(), FormatError> {
    if !v.is_finite() {
        return Err(needs_ruby("a record holds NaN or Infinity"));
    }
    serde_json::to_writer(out, &v).map_err(|e| needs_ruby(e.to_string()))
}

/// Transcodes the value at the reader to JSON.
fn json_value(
    r: &mut Reader,
    out: &mut Vec<u8>,
    depth: usize,
    st: &mut Utf8State,
) -> Result<(), FormatError> {
    if depth > 512 {
        return Err(needs_ruby("record nests deeper than 512 levels"));
    }
    match r.head()? {
        Head::Nil => out.extend_from_slice(b"null"),
        Head::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        Head::Int(i) => {
            decimal(out, i);
        }
        Head::UInt(u) => {
            decimal(out, u);
        }
        Head::F32(f) => json_f64(out, f64::from(f))?,
        Head::F64(f) => json_f64(out, f)?,
        Head::Str(s) | Head::Bin(s) => {
            let site = if depth == 0 {
                Site::Value
            } else {
                Site::Nested
            };
            json_text(out, s, st, site)
        }
        Head::Array(n) => {
            out.push(b'[');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                json_value(r, out, depth + 1, st)?;
            }
            out.push(b']');
        }
        Head::Map(n) => {
            out.push(b'{');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                match r.head()? {
                    Head::Str(k) | Head::Bin(k) => json_text(out, k, st, Site::Nested),
                    _ => return Err(needs_ruby("a map key is not a string")),
                }
                out.push(b':');
                json_value(r, out, depth + 1, st)?;
            }
            out.push(b'}');
        }
        Head::Ext(..) => return Err(needs_ruby("a record holds a MessagePack extension value")),
    }
    Ok(())
}

/// Writes the record whose map header (`n` entries) was just read as JSON, reading its entries
/// as it goes: what [`write_formatted`] writes for it when nothing is injected.
fn json_record<'a>(
    r: &mut Reader<'a>,
    n: usize,
    out: &mut Vec<u8>,
    st: &mut Utf8State<'a>,
    add_newline: bool,
) -> Result<(), FormatError> {
    out.push(b'{');
    for i in 0..n {
        if i > 0 {
            out.push(b',');
        }
        let key = match r.head()? {
            Head::Str(k) | Head::Bin(k) => k,
            _ => return Err(needs_ruby("a record key is not a string")),
        };
        json_text(out, key, st, Site::Name);
        out.push(b':');
        st.field = key;
        json_value(r, out, 0, st)?;
    }
    out.push(b'}');
    if add_newline {
        out.push(b'\n');
    }
    Ok(())
}

/// Re-packs the value at the reader as Ruby's msgpack would after unpacking it (smallest
/// encodings, floats as float64).
fn msgpack_value(r: &mut Reader, out: &mut Vec<u8>, depth: usize) -> Result<(), FormatError> {
    if depth > 512 {
        return Err(needs_ruby("record nests deeper than 512 levels"));
    }
    match r.head()? {
        Head::Nil => out.push(0xc0),
        Head::Bool(b) => out.push(if b { 0xc3 } else { 0xc2 }),
        Head::Int(i) => pack_int(out, i),
        Head::UInt(u) => pack_uint(out, u),
        Head::F32(f) => {
            out.push(0xcb);
            out.extend_from_slice(&f64::from(f).to_be_bytes());
        }
        Head::F64(f) => {
            out.push(0xcb);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Head::Str(s) => pack_str(out, s),
        Head::Bin(_) => return Err(needs_ruby("a record holds binary data")),
        Head::Array(n) => {
            pack_container(out, n, 0x90, 0xdc);
            for _ in 0..n {
                msgpack_value(r, out, depth + 1)?;
            }
        }
        Head::Map(n) => {
            pack_container(out, n, 0x80, 0xde);
            for _ in 0..n * 2 {
                msgpack_value(r, out, depth + 1)?;
            }
        }
        Head::Ext(..) => return Err(needs_ruby("a record holds a MessagePack extension value")),
    }
    Ok(())
}

/// Ruby's `to_s` of a scalar, for data_key and single_value; `None` when the value is nil.
fn to_s(head: Head, out: &mut Vec<u8>, what: &str) -> Result<Option<()>, FormatError> {
    match head {
        Head::Nil => return Ok(None),
        Head::Str(s) | Head::Bin(s) => out.extend_from_slice(s),
        Head::Int(i) => {
            decimal(out, i);
        }
        Head::UInt(u) => {
            decimal(out, u);
        }
        Head::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        _ => {
            return Err(needs_ruby(format!(
                "{what} is not a string, integer or boolean"
            )))
        }
    }
    Ok(Some(()))
}

/// One top-level record entry: key bytes and the value's byte range.
struct Entry<'a> {
    key: &'a [u8],
    value: std::ops::Range<usize>,
}

fn chomp(out: &mut Vec<u8>, from: usize) {
    if out.len() > from && out.last() == Some(&b'\n') {
        out.pop();
        if out.len() > from && out.last() == Some(&b'\r') {
            out.pop();
        }
    } else if out.len() > from && out.last() == Some(&b'\r') {
        out.pop();
    }
}

/// Formats every event of `chunk` not skipped by `skip(event_index)`.
pub fn format_chunk(
    spec: &FormatSpec,
    chunk: &[u8],
    tag: Option<&str>,
    skip: &dyn Fn(u32) -> bool,
) -> Result<FormattedChunk, FormatError> {
    format_events(spec, chunk, tag, skip, true)
}

/// [`format_chunk`]; `single_pass`: whether the common JSON configuration may be formatted in
/// one pass (false only to test that both paths agree).
fn format_events(
    spec: &FormatSpec,
    chunk: &[u8],
    tag: Option<&str>,
    skip: &dyn Fn(u32) -> bool,
    single_pass: bool,
) -> Result<FormattedChunk, FormatError> {
    let mut out = FormattedChunk {
        batch: RecordBatch::with_capacity(chunk.len() / 64, chunk.len() + chunk.len() / 4),
        ..Default::default()
    };
    if spec.inject.tag_key.is_some() && tag.is_none() {
        return Err(needs_ruby("inject tag_key needs the chunk's tag"));
    }
    let mut r = Reader::new(chunk);
    let mut entries: Vec<Entry> = Vec::with_capacity(16);
    let mut scratch: Vec<u8> = Vec::new();
    let mut event: u32 = 0;
    // Some(add_newline): records are formatted in one pass (see below).
    let json_single_pass = match spec.format {
        DataFormat::Json { add_newline }
            if single_pass
                && spec.inject.is_empty()
                && spec.data_key.is_none()
                && spec.partition_key_field.is_none()
                && spec.explicit_hash_key_field.is_none()
                && spec.compression == Compression::None =>
        {
            Some(add_newline)
        }
        _ => None,
    };
    while !r.at_end() {
        let index = event;
        event += 1;
        let event_start = r.pos;
        if r.head()? != Head::Array(2) {
            return Err(FormatError::Corrupt(MsgpackError {
                offset: event_start,
                what: "event is not a [time, record] pair",
            }));
        }
        let (sec, nsec) = match r.head()? {
            Head::Ext(0, b) if b.len() == 8 => (
                i64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
                u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            ),
            Head::UInt(s) => (s as i64, 0),
            Head::Int(s) => (s, 0),
            _ => return Err(needs_ruby("event time is neither EventTime nor an integer")),
        };
        let record_start = r.pos;
        if skip(index) {
            r.skip()?;
            continue;
        }
        let n = match r.head()? {
            Head::Map(n) => n,
            _ => {
                r.pos = record_start;
                r.skip()?;
                out.refused
                    .push((index, "record is not a hash (map)".into()));
                continue;
            }
        };
        // The common configuration (JSON, nothing injected, no key fields) is formatted while the
        // record is read. Any error there (a value Ruby must format, corrupt MessagePack) undoes
        // the record and reads it again below, which fails the chunk with the two-pass path's
        // error: the first one in its order (keys, then values).
        let mut single_pass = None;
        if let Some(add_newline) = json_single_pass {
            let start = out.batch.mark();
            let body = r.pos;
            let target = out.batch.buffer();
            let data_from = target.len();
            let mut st = Utf8State::new(spec.invalid_utf8);
            if json_record(&mut r, n, target, &mut st, add_newline).is_ok() {
                single_pass = Some((start, data_from, st));
            } else {
                out.batch.abandon(start);
                r.pos = body;
            }
        }
        entries.clear();
        let unread = if single_pass.is_some() { 0 } else { n };
        for _ in 0..unread {
            let key = match r.head()? {
                Head::Str(k) | Head::Bin(k) => k,
                _ => return Err(needs_ruby("a record key is not a string")),
            };
            let start = r.pos;
            r.skip()?;
            entries.push(Entry {
                key,
                value: start..r.pos,
            });
        }
        let field = |name: &str| {
            entries
                .iter()
                .rev()
                .find(|e| e.key == name.as_bytes())
                .map(|e| Reader {
                    buf: chunk,
                    pos: e.value.start,
                })
        };

        // Keys first: a record without a usable key is refused before any formatting work.
        let partition_key = match &spec.partition_key_field {
            None => None,
            Some(name) => {
                scratch.clear();
                let ok = match field(name) {
                    Some(mut v) => to_s(v.head()?, &mut scratch, "partition_key field")
                        .unwrap_or(None)
                        .is_some(),
                    None => false,
                };
                let key = if ok {
                    std::str::from_utf8(&scratch).ok().map(str::to_string)
                } else {
                    None
                };
                match key {
                    Some(k) => match validate_partition_key(&k) {
                        Ok(()) => Some(k),
                        Err(e) => {
                            out.refused
                                .push((index, format!("partition_key field '{name}': {e}")));
                            continue;
                        }
                    },
                    None => {
                        out.refused.push((index, format!("partition_key field '{name}' is missing, null, not a string or number, or not UTF-8")));
                        continue;
                    }
                }
            }
        };
        let explicit_hash_key = match &spec.explicit_hash_key_field {
            None => None,
            Some(name) => {
                scratch.clear();
                // A decimal string or a non-negative integer; anything else is refused.
                let text = match field(name) {
                    Some(mut v) => match v.head()? {
                        h @ (Head::Str(_) | Head::UInt(_)) => {
                            to_s(h, &mut scratch, "explicit_hash_key field")?
                                .and_then(|_| std::str::from_utf8(&scratch).ok())
                        }
                        _ => None,
                    },
                    None => None,
                };
                match text.map(parse_explicit_hash_key) {
                    Some(Ok(h)) => Some(h),
                    Some(Err(e)) => {
                        out.refused
                            .push((index, format!("explicit_hash_key field '{name}': {e}")));
                        continue;
                    }
                    None => {
                        out.refused.push((index, format!("explicit_hash_key field '{name}' is missing or not a decimal string/integer")));
                        continue;
                    }
                }
            }
        };

        let single_pass_done = single_pass.is_some();
        let (start, data_from, mut st) = match single_pass {
            Some(done) => done,
            None => (
                out.batch.mark(),
                if spec.compression == Compression::None {
                    out.batch.buffer().len()
                } else {
                    0
                },
                Utf8State::new(spec.invalid_utf8),
            ),
        };
        let target: &mut Vec<u8> = if spec.compression == Compression::None {
            out.batch.buffer()
        } else {
            scratch.clear();
            &mut scratch
        };
        // Ok(false): data_key is missing or nil, which the anchor reports as a missing key.
        let formatted: Result<bool, FormatError> = (|| {
            if single_pass_done {
                if spec.chomp_record {
                    chomp(target, data_from);
                }
                Ok(true)
            } else if let Some(dk) = &spec.data_key {
                match field(dk) {
                    Some(mut v) => {
                        Ok(to_s(v.head()?, target, &format!("data_key field '{dk}'"))?.is_some())
                    }
                    None => Ok(false),
                }
            } else {
                write_formatted(spec, chunk, &entries, tag, sec, nsec, target, &mut st)?;
                if spec.chomp_record {
                    chomp(target, data_from);
                }
                Ok(true)
            }
        })();
        let formatted = formatted?;
        if formatted && spec.append_newline {
            chomp(target, data_from);
            target.push(b'\n');
        }
        if !formatted {
            out.batch.abandon(start);
            out.refused.push((
                index,
                format!(
                    "Key '{}' doesn't exist",
                    spec.data_key.as_deref().unwrap_or("")
                ),
            ));
            continue;
        }
        if let Some(reason) = st.refusal {
            out.batch.abandon(start);
            out.refused.push((index, reason));
            continue;
        }
        if spec.compression != Compression::None {
            let compressed = compress(spec.compression, &scratch);
            out.batch.buffer().extend_from_slice(&compressed);
        }
        let size = out.batch.buffer().len() - start;
        if size > spec.max_data_bytes {
            out.batch.abandon(start);
            out.refused.push((
                index,
                format!(
                    "formatted record is {size} bytes; max_record_size is {} bytes",
                    spec.max_data_bytes
                ),
            ));
            continue;
        }
        out.batch
            .commit(start, partition_key.as_deref(), explicit_hash_key);
        out.events.push(index);
        out.scrubbed += u32::from(st.scrubbed);
    }
    out.event_count = event;
    Ok(out)
}

fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    use flate2::write::{GzEncoder, ZlibEncoder};
    let level = flate2::Compression::default();
    match c {
        Compression::None => data.to_vec(),
        Compression::Zlib => {
            let mut e = ZlibEncoder::new(Vec::with_capacity(data.len() / 2 + 16), level);
            e.write_all(data).expect("writing to a Vec cannot fail");
            e.finish().expect("writing to a Vec cannot fail")
        }
        Compression::Gzip => {
            let mut e = GzEncoder::new(Vec::with_capacity(data.len() / 2 + 32), level);
            e.write_all(data).expect("writing to a Vec cannot fail");
            e.finish().expect("writing to a Vec cannot fail")
        }
    }
}

/// Writes one record with inject applied, in the configured format.
#[allow(clippy::too_many_arguments)]
fn write_formatted<'a>(
    spec: &FormatSpec,
    chunk: &'a [u8],
    entries: &[Entry<'a>],
    tag: Option<&str>,
    sec: i64,
    nsec: u32,
    out: &mut Vec<u8>,
    st: &mut Utf8State<'a>,
) -> Result<(), FormatError> {
    let inject = &spec.inject;
    // Injected values replace existing keys in place (Ruby Hash#[]= keeps the position) and
    // are otherwise appended in fluentd's order.
    let no_inject = inject.is_empty();
    let injected = |key: &[u8]| !no_inject && inject.keys().any(|k| k.as_bytes() == key);
    let write_injected = |key: &str, out: &mut Vec<u8>, json: bool| -> Result<(), FormatError> {
        if let Some((k, v)) = &inject.hostname {
            if k == key {
                if json {
                    json_string(out, v)
                } else {
                    pack_str(out, v.as_bytes())
                }
                return Ok(());
            }
        }
        if let Some((k, v)) = &inject.worker_id {
            if k == key {
                if json {
                    decimal(out, *v);
                } else {
                    pack_int(out, *v)
                }
                return Ok(());
            }
        }
        if let Some(k) = &inject.tag_key {
            if k == key {
                let t = tag.unwrap_or("");
                if json {
                    json_string(out, t)
                } else {
                    pack_str(out, t.as_bytes())
                }
                return Ok(());
            }
        }
        if let Some((k, tt)) = &inject.time {
            if k == key {
                match tt {
                    TimeType::Unixtime
                    | TimeType::UnixtimeMillis
                    | TimeType::UnixtimeMicros
                    | TimeType::UnixtimeNanos => {
                        let v = match tt {
                            TimeType::UnixtimeMillis => sec * 1_000 + i64::from(nsec / 1_000_000),
                            TimeType::UnixtimeMicros => sec * 1_000_000 + i64::from(nsec / 1_000),
                            TimeType::UnixtimeNanos => sec * 1_000_000_000 + i64::from(nsec),
                            _ => sec,
                        };
                        if json {
                            decimal(out, v);
                        } else {
                            pack_int(out, v)
                        }
                    }
                    TimeType::Float => {
                        // Exact integer microseconds, then one correctly rounded division: the
                        // same double Ruby gets from the truncated Rational.
                        let f = (sec * 1_000_000 + i64::from(nsec / 1_000)) as f64 / 1_000_000.0;
                        if json {
                            json_f64(out, f)?;
                        } else {
                            out.push(0xcb);
                            out.extend_from_slice(&f.to_be_bytes());
                        }
                    }
                    TimeType::String { items, zone } => {
                        let mut s = Vec::with_capacity(40);
                        format_time(&mut s, sec, nsec, items, *zone)?;
                        if json {
                            // chrono writes UTF-8 (the format is a &str): nothing to replace.
                            json_string(out, &String::from_utf8_lossy(&s))
                        } else {
                            pack_str(out, &s)
                        }
                    }
                }
            }
        }
        Ok(())
    };
    // Duplicate keys cannot come from a Ruby Hash; the last one wins there.
    let mut keys_present: Vec<&str> = Vec::new();
    if !inject.is_empty() {
        for k in inject.keys() {
            if entries.iter().any(|e| e.key == k.as_bytes()) {
                keys_present.push(k);
            }
        }
    }
    let appended: Vec<&str> = inject
        .keys()
        .filter(|k| !keys_present.contains(k))
        .collect();
    match &spec.format {
        DataFormat::Json { add_newline } => {
            out.push(b'{');
            let mut first = true;
            for e in entries {
                if !first {
                    out.push(b',');
                }
                first = false;
                json_text(out, e.key, st, Site::Name);
                out.push(b':');
                if injected(e.key) {
                    write_injected(std::str::from_utf8(e.key).unwrap_or(""), out, true)?;
                } else {
                    st.field = e.key;
                    json_value(
                        &mut Reader {
                            buf: chunk,
                            pos: e.value.start,
                        },
                        out,
                        0,
                        st,
                    )?;
                }
            }
            for k in appended {
                if !first {
                    out.push(b',');
                }
                first = false;
                json_string(out, k);
                out.push(b':');
                write_injected(k, out, true)?;
            }
            out.push(b'}');
            if *add_newline {
                out.push(b'\n');
            }
        }
        DataFormat::Msgpack => {
            pack_container(out, entries.len() + appended.len(), 0x80, 0xde);
            for e in entries {
                pack_str(out, e.key);
                if injected(e.key) {
                    write_injected(std::str::from_utf8(e.key).unwrap_or(""), out, false)?;
                } else {
                    msgpack_value(
                        &mut Reader {
                            buf: chunk,
                            pos: e.value.start,
                        },
                        out,
                        0,
                    )?;
                }
            }
            for k in appended {
                pack_str(out, k.as_bytes());
                write_injected(k, out, false)?;
            }
        }
        DataFormat::SingleValue {
            message_key,
            add_newline,
        } => {
            if inject.keys().any(|k| k == message_key) {
                let mut tmp = Vec::new();
                write_injected(message_key, &mut tmp, false)?;
                let mut r = Reader::new(&tmp);
                let head = r.head()?;
                // Injected strings and integers print as themselves; floats need Ruby.
                to_s(head, out, "injected message_key value")?;
            } else if let Some(e) = entries
                .iter()
                .rev()
                .find(|e| e.key == message_key.as_bytes())
            {
                let mut r = Reader {
                    buf: chunk,
                    pos: e.value.start,
                };
                to_s(
                    r.head()?,
                    out,
                    &format!("single_value message_key '{message_key}'"),
                )?;
            }
            if *add_newline {
                out.push(b'\n');
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(out: &mut Vec<u8>, sec: u32, nsec: u32, record: &[(&str, &str)]) {
        out.extend_from_slice(&[0x92, 0xd7, 0x00]);
        out.extend_from_slice(&sec.to_be_bytes());
        out.extend_from_slice(&nsec.to_be_bytes());
        pack_container(out, record.len(), 0x80, 0xde);
        for (k, v) in record {
            pack_str(out, k.as_bytes());
            pack_str(out, v.as_bytes());
        }
    }

    fn spec(format: DataFormat) -> FormatSpec {
        FormatSpec {
            format,
            data_key: None,
            chomp_record: false,
            append_newline: false,
            compression: Compression::None,
            inject: Inject::default(),
            partition_key_field: None,
            explicit_hash_key_field: None,
            max_data_bytes: 1024 * 1024,
            invalid_utf8: InvalidUtf8::Replace,
        }
    }

    /// Firehose's append_new_line: one trailing newline (LF, CRLF or CR) is replaced by "\n",
    /// or "\n" added; data_key values too; before compression.
    #[test]
    fn append_newline_ends_every_record_with_one_newline() {
        let mut chunk = Vec::new();
        for v in ["plain", "ends lf\n", "ends crlf\r\n", "two\n\n", ""] {
            event(&mut chunk, 1, 0, &[("message", v)]);
        }
        let mut s = spec(DataFormat::SingleValue {
            message_key: "message".into(),
            add_newline: false,
        });
        s.append_newline = true;
        let out = format_chunk(&s, &chunk, None, &|_| false).unwrap();
        let got: Vec<&[u8]> = (0..out.batch.len()).map(|i| out.batch.data(i)).collect();
        let want: Vec<&[u8]> = vec![b"plain\n", b"ends lf\n", b"ends crlf\n", b"two\n\n", b"\n"];
        assert_eq!(got, want);
        s.data_key = Some("message".into());
        let out = format_chunk(&s, &chunk, None, &|_| false).unwrap();
        assert_eq!(out.batch.data(0), b"plain\n");
        // json adds its own newline: still one.
        let mut s = spec(DataFormat::Json { add_newline: true });
        s.append_newline = true;
        let out = format_chunk(&s, &chunk, None, &|_| false).unwrap();
        assert_eq!(out.batch.data(0), b"{\"message\":\"plain\"}\n");
        s.compression = Compression::Gzip;
        let out = format_chunk(&s, &chunk, None, &|_| false).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(out.batch.data(0)),
            &mut text,
        )
        .unwrap();
        assert_eq!(text, "{\"message\":\"plain\"}\n");
    }

    #[test]
    fn json_with_inject_and_keys() {
        let mut chunk = Vec::new();
        event(
            &mut chunk,
            1_700_000_000,
            123_456_789,
            &[("message", "GET / \"x\"\n"), ("host", "h1")],
        );
        event(&mut chunk, 1_700_000_001, 0, &[("message", "no host")]);
        let mut s = spec(DataFormat::Json { add_newline: true });
        s.partition_key_field = Some("host".into());
        s.inject.tag_key = Some("tag".into());
        s.inject.time = Some((
            "time".into(),
            TimeType::String {
                items: ruby_time_format("%Y-%m-%dT%H:%M:%S.%N%z").unwrap(),
                zone: TimeZoneSpec::Fixed(9 * 3600),
            },
        ));
        let f = format_chunk(&s, &chunk, Some("apache.access"), &|_| false).unwrap();
        assert_eq!(f.event_count, 2);
        assert_eq!(f.batch.len(), 1);
        assert_eq!(std::str::from_utf8(f.batch.data(0)).unwrap(), "{\"message\":\"GET / \\\"x\\\"\\n\",\"host\":\"h1\",\"tag\":\"apache.access\",\"time\":\"2023-11-15T07:13:20.123456789+0900\"}\n");
        assert_eq!(f.batch.partition_key(0), Some("h1"));
        assert_eq!(f.refused.len(), 1);
        assert_eq!(f.refused[0].0, 1);
    }

    #[test]
    fn data_key_chomp_compression_and_skip() {
        let mut chunk = Vec::new();
        event(&mut chunk, 1, 0, &[("log", "line one\n")]);
        event(&mut chunk, 2, 0, &[("other", "x")]);
        event(&mut chunk, 3, 0, &[("log", "line three")]);
        let mut s = spec(DataFormat::Json { add_newline: true });
        s.data_key = Some("log".into());
        let f = format_chunk(&s, &chunk, None, &|i| i == 2).unwrap();
        assert_eq!(f.batch.data(0), b"line one\n");
        assert_eq!(f.events, vec![0]);
        assert_eq!(f.refused, vec![(1, "Key 'log' doesn't exist".to_string())]);
        let mut s = spec(DataFormat::SingleValue {
            message_key: "log".into(),
            add_newline: true,
        });
        s.chomp_record = true;
        s.compression = Compression::Zlib;
        let f = format_chunk(&s, &chunk, None, &|_| false).unwrap();
        let mut d = flate2::read::ZlibDecoder::new(f.batch.data(0));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut d, &mut text).unwrap();
        assert_eq!(text, "line one\n");
    }

    #[test]
    fn unusual_values_take_the_ruby_path() {
        let mut chunk = Vec::new();
        chunk.extend_from_slice(&[0x92, 0x01, 0x81, 0xa1, b'f', 0xcb]);
        chunk.extend_from_slice(&f64::NAN.to_be_bytes());
        let s = spec(DataFormat::Json { add_newline: true });
        assert!(matches!(
            format_chunk(&s, &chunk, None, &|_| false),
            Err(FormatError::NeedsRuby(_))
        ));
        assert!(matches!(
            format_chunk(&s, &[0x92, 0x01], None, &|_| false),
            Err(FormatError::Corrupt(_))
        ));
        assert!(ruby_time_format("%Y %Z").is_none());
        assert!(ruby_time_format("%Y-%m-%d %H:%M:%S.%3N %:z").is_some());
    }

    #[test]
    fn msgpack_repacks_like_ruby() {
        let mut chunk = Vec::new();
        event(&mut chunk, 1, 0, &[("a", "b")]);
        let mut s = spec(DataFormat::Msgpack);
        s.inject.worker_id = Some(("w".into(), 3));
        let f = format_chunk(&s, &chunk, None, &|_| false).unwrap();
        assert_eq!(
            f.batch.data(0),
            &[0x82, 0xa1, b'a', 0xa1, b'b', 0xa1, b'w', 0x03]
        );
    }

    /// `(input, Ruby 3.1's "input".force_encoding("UTF-8").scrub)` in hex, from actually running
    /// Ruby: truncated and cut-off sequences, overlongs, UTF-8-encoded surrogates, F5..FF, lone
    /// continuation bytes, and valid sequences next to invalid ones.
    const RUBY_SCRUB: &[(&str, &str)] = &[
        ("ff", "ef bf bd"),
        ("fe", "ef bf bd"),
        ("f5", "ef bf bd"),
        (
            "f8 88 80 80 80",
            "ef bf bd ef bf bd ef bf bd ef bf bd ef bf bd",
        ),
        (
            "fc 84 80 80 80 80",
            "ef bf bd ef bf bd ef bf bd ef bf bd ef bf bd ef bf bd",
        ),
        ("c0 af", "ef bf bd ef bf bd"),
        ("c0 80", "ef bf bd ef bf bd"),
        ("c1 bf", "ef bf bd ef bf bd"),
        ("e0 80 af", "ef bf bd ef bf bd ef bf bd"),
        ("e0 9f bf", "ef bf bd ef bf bd ef bf bd"),
        ("f0 80 80 af", "ef bf bd ef bf bd ef bf bd ef bf bd"),
        ("f0 8f bf bf", "ef bf bd ef bf bd ef bf bd ef bf bd"),
        ("ed a0 80", "ef bf bd ef bf bd ef bf bd"),
        ("ed bf bf", "ef bf bd ef bf bd ef bf bd"),
        (
            "ed a0 80 ed b0 80",
            "ef bf bd ef bf bd ef bf bd ef bf bd ef bf bd ef bf bd",
        ),
        ("f4 90 80 80", "ef bf bd ef bf bd ef bf bd ef bf bd"),
        ("80", "ef bf bd"),
        ("bf", "ef bf bd"),
        ("41 80 42", "41 ef bf bd 42"),
        ("80 80 80", "ef bf bd ef bf bd ef bf bd"),
        ("c3", "ef bf bd"),
        ("e3 81", "ef bf bd"),
        ("f0 9f 98", "ef bf bd"),
        ("f0 9f 98 41", "ef bf bd 41"),
        ("e3 81 41", "ef bf bd 41"),
        ("f0 9f 41", "ef bf bd 41"),
        ("e3 41", "ef bf bd 41"),
        ("c3 41", "ef bf bd 41"),
        ("f0 41", "ef bf bd 41"),
        ("61 f0 9f 98", "61 ef bf bd"),
        ("61 f0 9f 98 80", "61 f0 9f 98 80"),
        ("e2 82", "ef bf bd"),
        ("e2 82 ac", "e2 82 ac"),
        ("f0 9f 98 80", "f0 9f 98 80"),
        (
            "e1 80 e2 f0 91 92 f1 bf 41",
            "ef bf bd ef bf bd ef bf bd ef bf bd 41",
        ),
        ("ed 9f bf", "ed 9f bf"),
        ("ee 80 80", "ee 80 80"),
        ("f4 8f bf bf", "f4 8f bf bf"),
        ("f4 90", "ef bf bd ef bf bd"),
        ("f4 8f", "ef bf bd"),
        ("c2", "ef bf bd"),
        ("df bf", "df bf"),
        ("e0 a0 80", "e0 a0 80"),
        ("e0 a0", "ef bf bd"),
        ("e0 80", "ef bf bd ef bf bd"),
        ("f1 80 80", "ef bf bd"),
        ("f1 80 80 c3 a9", "ef bf bd c3 a9"),
        (
            "f8 80 80 80 80 80 61",
            "ef bf bd ef bf bd ef bf bd ef bf bd ef bf bd ef bf bd 61",
        ),
        ("fe fe ff ff", "ef bf bd ef bf bd ef bf bd ef bf bd"),
        ("c2 c2 c2", "ef bf bd ef bf bd ef bf bd"),
        ("61 ed a0 62", "61 ef bf bd ef bf bd 62"),
        ("61 ed 9f 62", "61 ef bf bd 62"),
        ("e0 9f 80 61", "ef bf bd ef bf bd ef bf bd 61"),
        ("e0 a0 61", "ef bf bd 61"),
        ("f0 90 61", "ef bf bd 61"),
        ("f0 8f 61", "ef bf bd ef bf bd 61"),
        ("f4 80 80", "ef bf bd"),
        ("f4 80 80 41", "ef bf bd 41"),
        ("f0 80", "ef bf bd ef bf bd"),
        ("ed a0", "ef bf bd ef bf bd"),
        ("ed 80", "ef bf bd"),
        ("c0", "ef bf bd"),
    ];

    fn hex(h: &str) -> Vec<u8> {
        h.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    fn event_bytes(out: &mut Vec<u8>, sec: u32, record: &[(&[u8], &[u8])]) {
        out.extend_from_slice(&[0x92, 0xd7, 0x00]);
        out.extend_from_slice(&sec.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        pack_container(out, record.len(), 0x80, 0xde);
        for (k, v) in record {
            pack_str(out, k);
            pack_str(out, v);
        }
    }

    #[test]
    fn replacement_is_ruby_scrub_byte_for_byte() {
        for (input, ruby) in RUBY_SCRUB {
            let (input, ruby) = (&hex(input)[..], &hex(ruby)[..]);
            let mut out = Vec::new();
            let mut st = Utf8State::new(InvalidUtf8::Replace);
            json_text(&mut out, input, &mut st, Site::Value);
            let mut want = b"\"".to_vec();
            want.extend_from_slice(ruby);
            want.push(b'"');
            assert_eq!(out, want, "input {input:02x?}");
            assert_eq!(st.scrubbed, std::str::from_utf8(input).is_err());
            assert_eq!(String::from_utf8_lossy(input).as_bytes(), ruby);
            assert!(st.refusal.is_none());
        }
    }

    proptest::proptest! {
        /// Any bytes become a JSON string that reads back as `from_utf8_lossy` of them (which is
        /// Ruby's scrub: see RUBY_SCRUB), control characters and quotes included.
        #[test]
        fn any_bytes_become_valid_json(bytes in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::sample::select(vec![0x00u8, 0x0a, 0x22, 0x5c, 0x41, 0x7f, 0x80, 0x8f,
                    0x9f, 0xa0, 0xbf, 0xc0, 0xc2, 0xdf, 0xe0, 0xed, 0xef, 0xf0, 0xf4, 0xf5, 0xff]),
                proptest::num::u8::ANY,
            ],
            0..24,
        )) {
            let mut out = Vec::new();
            let mut st = Utf8State::new(InvalidUtf8::Replace);
            json_text(&mut out, &bytes, &mut st, Site::Value);
            let back: String = serde_json::from_slice(&out).expect("valid JSON");
            proptest::prop_assert_eq!(back, String::from_utf8_lossy(&bytes));
            proptest::prop_assert_eq!(st.scrubbed, std::str::from_utf8(&bytes).is_err());
        }
    }

    /// A MessagePack value for the single-pass test: every kind fluentd's chunks can hold, and
    /// some they should not (NaN, extension values, non-string keys, invalid UTF-8).
    fn msgpack_value_strategy() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let text = proptest::collection::vec(
            prop_oneof![
                4 => proptest::sample::select(b"ab \"\\\n/".to_vec()),
                1 => proptest::sample::select(vec![0x00u8, 0x1f, 0x7f, 0x80, 0xc3, 0xa9, 0xe2, 0xff]),
            ],
            0..12,
        );
        let leaf = prop_oneof![
            Just(vec![0xc0]),
            any::<bool>().prop_map(|b| vec![if b { 0xc3 } else { 0xc2 }]),
            any::<i64>().prop_map(|v| {
                let mut o = Vec::new();
                pack_int(&mut o, v);
                o
            }),
            prop_oneof![
                Just(f64::NAN),
                Just(1.5),
                Just(-0.0),
                Just(1e300),
                any::<f64>()
            ]
            .prop_map(|f| {
                let mut o = vec![0xcb];
                o.extend_from_slice(&f.to_be_bytes());
                o
            }),
            text.clone().prop_map(|t| {
                let mut o = Vec::new();
                pack_str(&mut o, &t);
                o
            }),
            text.clone().prop_map(|t| {
                let mut o = vec![0xc4, t.len() as u8];
                o.extend_from_slice(&t);
                o
            }),
            Just(vec![0xd4, 0x01, 0x00]),
        ];
        leaf.prop_recursive(3, 24, 4, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(|vs| {
                    let mut o = Vec::new();
                    pack_container(&mut o, vs.len(), 0x90, 0xdc);
                    vs.concat().into_iter().for_each(|b| o.push(b));
                    o
                }),
                proptest::collection::vec((text.clone(), inner), 0..4).prop_map(|kvs| {
                    let mut o = Vec::new();
                    pack_container(&mut o, kvs.len(), 0x80, 0xde);
                    for (k, v) in kvs {
                        pack_str(&mut o, &k);
                        o.extend_from_slice(&v);
                    }
                    o
                }),
            ]
        })
    }

    /// A record key: a string (some with escapes or invalid UTF-8), or now and then an integer.
    fn record_key_strategy() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            8 => proptest::collection::vec(proptest::sample::select(b"kA\"\xff".to_vec()), 0..4)
                .prop_map(|k| {
                    let mut o = Vec::new();
                    pack_str(&mut o, &k);
                    o
                }),
            1 => Just(vec![0x01u8]),
        ]
    }

    proptest::proptest! {
        /// The single-pass JSON path formats, refuses and fails exactly as the two-pass path:
        /// records with keys that are not strings, values Ruby must format, invalid UTF-8 in
        /// either mode, records that are not maps, and chunks cut short.
        #[test]
        fn single_pass_json_matches_two_passes(
            records in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        (
                            record_key_strategy(),
                            msgpack_value_strategy(),
                        ),
                        0..5,
                    ),
                    0..12u8,
                ),
                0..6,
            ),
            cut in 0..40usize,
            add_newline in proptest::bool::ANY,
            chomp_record in proptest::bool::ANY,
            refuse in proptest::bool::ANY,
            max_data_bytes in proptest::prop_oneof![proptest::strategy::Just(1024usize * 1024), 0..40usize],
        ) {
            let mut chunk = Vec::new();
            for (fields, shape) in &records {
                chunk.extend_from_slice(&[0x92, 0xd7, 0x00, 0, 0, 0, 1, 0, 0, 0, 0]);
                if *shape == 0 {
                    chunk.push(0xc0); // not a map
                    continue;
                }
                pack_container(&mut chunk, fields.len(), 0x80, 0xde);
                for (k, v) in fields {
                    chunk.extend_from_slice(k);
                    chunk.extend_from_slice(v);
                }
            }
            if cut < 4 {
                chunk.truncate(chunk.len().saturating_sub(cut));
            }
            let mut s = spec(DataFormat::Json { add_newline });
            s.chomp_record = chomp_record;
            s.max_data_bytes = max_data_bytes;
            s.invalid_utf8 = if refuse { InvalidUtf8::Refuse } else { InvalidUtf8::Replace };
            let skip = |i: u32| i == 2;
            let one = format_events(&s, &chunk, None, &skip, true);
            let two = format_events(&s, &chunk, None, &skip, false);
            proptest::prop_assert_eq!(format!("{one:?}"), format!("{two:?}"));
        }
    }

    #[test]
    fn json_replaces_invalid_utf8_in_values_and_keys() {
        let mut chunk = Vec::new();
        event_bytes(
            &mut chunk,
            1,
            &[(b"message", b"caf\xe9 \"\xff\"\n\xf0\x9f\x98")],
        );
        event_bytes(&mut chunk, 2, &[(b"ok", b"fine \xe2\x82\xac")]);
        event_bytes(&mut chunk, 3, &[(b"k\xc0\xaf", b"v")]);
        // {"a": ["x\xed\xa0\x80", {"n\x80": bin "\xf8"}]}
        chunk.extend_from_slice(&[0x92, 0x04, 0x81, 0xa1, b'a', 0x92]);
        pack_str(&mut chunk, b"x\xed\xa0\x80");
        chunk.push(0x81);
        pack_str(&mut chunk, b"n\x80");
        chunk.extend_from_slice(&[0xc4, 0x01, 0xf8]);
        let s = spec(DataFormat::Json { add_newline: true });
        let f = format_chunk(&s, &chunk, None, &|_| false).unwrap();
        assert!(f.refused.is_empty());
        assert_eq!(f.events, vec![0, 1, 2, 3]);
        assert_eq!(f.scrubbed, 3);
        let want = [
            "{\"message\":\"caf\u{fffd} \\\"\u{fffd}\\\"\\n\u{fffd}\"}\n",
            "{\"ok\":\"fine \u{20ac}\"}\n",
            "{\"k\u{fffd}\u{fffd}\":\"v\"}\n",
            "{\"a\":[\"x\u{fffd}\u{fffd}\u{fffd}\",{\"n\u{fffd}\":\"\u{fffd}\"}]}\n",
        ];
        for (i, w) in want.iter().enumerate() {
            let got = std::str::from_utf8(f.batch.data(i)).expect("valid UTF-8");
            assert_eq!(got, *w);
            serde_json::from_str::<serde_json::Value>(got).expect("valid JSON");
        }
    }

    #[test]
    fn refuse_mode_refuses_records_with_invalid_utf8() {
        let mut chunk = Vec::new();
        event_bytes(&mut chunk, 1, &[(b"host", b"h"), (b"message", b"ab\xffc")]);
        event_bytes(&mut chunk, 2, &[(b"message", b"fine")]);
        event_bytes(&mut chunk, 3, &[(b"caf\xe9", b"v")]);
        chunk.extend_from_slice(&[0x92, 0x04, 0x81, 0xa5]);
        chunk.extend_from_slice(b"outer");
        chunk.extend_from_slice(&[0x91, 0xa2, b'x', 0xc3]);
        let mut s = spec(DataFormat::Json { add_newline: true });
        s.invalid_utf8 = InvalidUtf8::Refuse;
        let f = format_chunk(&s, &chunk, None, &|_| false).unwrap();
        assert_eq!(f.events, vec![1]);
        assert_eq!(f.batch.len(), 1);
        assert_eq!(f.batch.data(0), b"{\"message\":\"fine\"}\n");
        assert_eq!(f.scrubbed, 0);
        let tail = "; sent to the error stream because invalid_utf8 is error";
        assert_eq!(
            f.refused,
            vec![
                (0, format!("record has invalid UTF-8 in field \"message\" (byte 0xff at offset 2){tail}")),
                (2, format!("record has invalid UTF-8 in a field name (\"caf\u{fffd}\": byte 0xe9 at offset 3){tail}")),
                (3, format!("record has invalid UTF-8 in field \"outer\" (a string nested in it: byte 0xc3 at offset 1){tail}")),
            ]
        );
    }

    #[test]
    fn raw_formats_keep_invalid_bytes() {
        let bad: &[u8] = b"line \xff\xfe \xe3\x81";
        let mut chunk = Vec::new();
        event_bytes(&mut chunk, 1, &[(b"message", bad), (b"k\xc0", b"v")]);
        for mode in [InvalidUtf8::Replace, InvalidUtf8::Refuse] {
            let mut s = spec(DataFormat::SingleValue {
                message_key: "message".into(),
                add_newline: false,
            });
            s.invalid_utf8 = mode;
            let f = format_chunk(&s, &chunk, None, &|_| false).unwrap();
            assert_eq!(f.batch.data(0), bad);
            assert_eq!((f.scrubbed, f.refused.len()), (0, 0));

            let mut s = spec(DataFormat::Json { add_newline: true });
            s.data_key = Some("message".into());
            s.invalid_utf8 = mode;
            let f = format_chunk(&s, &chunk, None, &|_| false).unwrap();
            assert_eq!(f.batch.data(0), bad);
            assert_eq!((f.scrubbed, f.refused.len()), (0, 0));

            let mut s = spec(DataFormat::Msgpack);
            s.invalid_utf8 = mode;
            let f = format_chunk(&s, &chunk, None, &|_| false).unwrap();
            let mut want = vec![0x82];
            pack_str(&mut want, b"message");
            pack_str(&mut want, bad);
            pack_str(&mut want, b"k\xc0");
            pack_str(&mut want, b"v");
            assert_eq!(f.batch.data(0), &want[..]);
            assert_eq!((f.scrubbed, f.refused.len()), (0, 0));
        }
    }
}
