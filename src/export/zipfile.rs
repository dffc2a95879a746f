//! A streaming ZIP writer (PKWARE APPNOTE 6.3.10) for entries whose CRC and sizes are known
//! before their data: local headers, central directory, ZIP64 records, never a data descriptor.

/// Version 4.5: ZIP64. Written as "version needed" only by entries that use ZIP64.
const VERSION_ZIP64: u16 = 45;
/// Version 2.0: DEFLATE, and the default "version needed".
const VERSION_DEFAULT: u16 = 20;
/// "Made by" Unix (host 3) at version 4.5, so readers take the external attributes as a mode.
const MADE_BY_UNIX: u16 = (3 << 8) | VERSION_ZIP64;
/// General-purpose bit 11: names are UTF-8. Bit 3 (data descriptor) is never set.
const FLAG_UTF8: u16 = 1 << 11;
/// `S_IFREG | 0644` in the high half: extracted files are plain, readable files.
const EXTERNAL_ATTRIBUTES: u32 = 0o100644 << 16;
/// Every entry's DOS timestamp is 2020-01-01 00:00:00, so a collection version always gives the
/// same bytes. DOS dates count years from 1980: (40 << 9) | (1 << 5) | 1.
const DOS_DATE: u16 = (40 << 9) | (1 << 5) | 1;
const DOS_TIME: u16 = 0;
/// A 32-bit field holding this means "see the ZIP64 extra field"; so does 0xFFFF for counts.
const SENTINEL_32: u64 = 0xFFFF_FFFF;
const SENTINEL_16: u64 = 0xFFFF;
const ZIP64_EXTRA_TAG: u16 = 0x0001;

/// How an entry's data is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Stored,
    Deflated,
}

impl Method {
    fn code(self) -> u16 {
        match self {
            Method::Stored => 0,
            Method::Deflated => 8,
        }
    }
}

/// What the headers say about one entry; all of it is known before the data is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    pub name: String,
    pub method: Method,
    /// CRC-32 of the uncompressed data.
    pub crc32: u32,
    /// Bytes of data that follow the local header.
    pub compressed_size: u64,
    /// Bytes once decompressed.
    pub size: u64,
}

impl EntryMeta {
    /// Readers must find both sizes in the local header's ZIP64 field if either needs it.
    fn sizes_need_zip64(&self) -> bool {
        self.size >= SENTINEL_32 || self.compressed_size >= SENTINEL_32
    }
}

/// Why an entry cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    #[error("the entry name is {0} bytes long; ZIP allows at most 65,535")]
    NameTooLong(usize),
}

/// One central directory record, kept until the archive ends. This is all the writer holds:
/// memory grows with the number of entries, never with their sizes.
#[derive(Debug)]
struct CentralEntry {
    meta: EntryMeta,
    /// Where the entry's local header starts.
    offset: u64,
}

/// Writes an archive front to back into caller-owned buffers, counting every byte it asks the
/// caller to write so offsets stay right without `Seek`.
///
/// Why not a crate: async_zip 0.0.x writes 4-byte sizes in ZIP64 data descriptors, no ZIP64 end
/// record at exactly 65,535 entries, mode 0000 and an invalid date unless told otherwise; `zip`
/// is synchronous and built around `Write + Seek` (it seeks back to patch local headers), which
/// a response body cannot do. Every entry of an export has its CRC and sizes known
/// before it is written (records are compressed in memory, attachments spooled), so the whole
/// format needed is this small.
#[derive(Debug, Default)]
pub struct ZipWriter {
    /// Bytes of archive written so far (headers plus the data the caller promised to write).
    offset: u64,
    entries: Vec<CentralEntry>,
}

impl ZipWriter {
    pub fn new() -> ZipWriter {
        ZipWriter::default()
    }

    /// Appends the local header of `meta` to `out`. The caller must then write exactly
    /// `meta.compressed_size` bytes of data before the next entry or `finish`.
    pub fn begin_entry(&mut self, meta: EntryMeta, out: &mut Vec<u8>) -> Result<(), ZipError> {
        check_name(&meta.name)?;
        let start = out.len();
        write_local_header(&meta, out);
        let header_len = (out.len() - start) as u64;
        let offset = self.offset;
        self.offset += header_len + meta.compressed_size;
        self.entries.push(CentralEntry { meta, offset });
        Ok(())
    }

    /// Writes a whole entry whose data is in memory.
    pub fn add_entry(&mut self, meta: EntryMeta, data: &[u8], out: &mut Vec<u8>) -> Result<(), ZipError> {
        debug_assert_eq!(data.len() as u64, meta.compressed_size);
        self.begin_entry(meta, out)?;
        out.extend_from_slice(data);
        Ok(())
    }

    /// Ends the entries; the central directory follows, written piece by piece.
    pub fn finish(self) -> CentralDirectory {
        CentralDirectory {
            start: self.offset,
            count: self.entries.len() as u64,
            entries: self.entries.into_iter(),
            written: 0,
        }
    }
}

/// The tail of an archive: central records one at a time (so a huge directory is sent in
/// chunks like everything else), then the end records.
pub struct CentralDirectory {
    /// Offset of the first central record.
    start: u64,
    count: u64,
    entries: std::vec::IntoIter<CentralEntry>,
    /// Bytes of central records written so far.
    written: u64,
}

impl CentralDirectory {
    /// Appends the next central record to `out`; false once every record is written.
    pub fn write_next(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(entry) = self.entries.next() else {
            return false;
        };
        let start = out.len();
        write_central_header(&entry, out);
        self.written += (out.len() - start) as u64;
        true
    }

    /// Appends what remains of the central directory and the end records, ZIP64 ones when a
    /// count, size or offset does not fit the classic fields.
    pub fn write_end(mut self, out: &mut Vec<u8>) {
        while self.write_next(out) {}
        let end_offset = self.start + self.written;
        let needs_zip64 =
            self.count >= SENTINEL_16 || self.written >= SENTINEL_32 || self.start >= SENTINEL_32;
        if needs_zip64 {
            self.write_zip64_end(end_offset, out);
        }
        put_u32(out, 0x0605_4b50);
        put_u16(out, 0); // this disk
        put_u16(out, 0); // disk where the central directory starts
        put_u16(out, self.count.min(SENTINEL_16) as u16);
        put_u16(out, self.count.min(SENTINEL_16) as u16);
        put_u32(out, self.written.min(SENTINEL_32) as u32);
        put_u32(out, self.start.min(SENTINEL_32) as u32);
        put_u16(out, 0); // comment length
    }

    /// The ZIP64 end of central directory record and its locator.
    fn write_zip64_end(&self, record_offset: u64, out: &mut Vec<u8>) {
        put_u32(out, 0x0606_4b50);
        put_u64(out, 44); // size of the rest of this record
        put_u16(out, MADE_BY_UNIX);
        put_u16(out, VERSION_ZIP64);
        put_u32(out, 0); // this disk
        put_u32(out, 0); // disk where the central directory starts
        put_u64(out, self.count);
        put_u64(out, self.count);
        put_u64(out, self.written);
        put_u64(out, self.start);
        put_u32(out, 0x0706_4b50);
        put_u32(out, 0); // disk holding the ZIP64 end record
        put_u64(out, record_offset);
        put_u32(out, 1); // total disks
    }
}

fn check_name(name: &str) -> Result<(), ZipError> {
    if name.len() > usize::from(u16::MAX) {
        return Err(ZipError::NameTooLong(name.len()));
    }
    Ok(())
}

fn write_local_header(meta: &EntryMeta, out: &mut Vec<u8>) {
    let zip64 = meta.sizes_need_zip64();
    put_u32(out, 0x0403_4b50);
    put_common_fields(meta, zip64, out);
    if zip64 {
        put_u32(out, SENTINEL_32 as u32);
        put_u32(out, SENTINEL_32 as u32);
    } else {
        put_u32(out, meta.compressed_size as u32);
        put_u32(out, meta.size as u32);
    }
    put_u16(out, meta.name.len() as u16);
    put_u16(out, if zip64 { 20 } else { 0 });
    out.extend_from_slice(meta.name.as_bytes());
    if zip64 {
        put_u16(out, ZIP64_EXTRA_TAG);
        put_u16(out, 16);
        put_u64(out, meta.size);
        put_u64(out, meta.compressed_size);
    }
}

fn write_central_header(entry: &CentralEntry, out: &mut Vec<u8>) {
    let meta = &entry.meta;
    // The extra field holds, in this order, each value whose classic field is the sentinel.
    let large: Vec<u64> = [meta.size, meta.compressed_size, entry.offset]
        .into_iter()
        .filter(|&value| value >= SENTINEL_32)
        .collect();
    let classic = |value: u64| value.min(SENTINEL_32) as u32;
    let zip64 = !large.is_empty() || meta.sizes_need_zip64();
    put_u32(out, 0x0201_4b50);
    put_u16(out, MADE_BY_UNIX);
    put_common_fields(meta, zip64, out);
    put_u32(out, classic(meta.compressed_size));
    put_u32(out, classic(meta.size));
    put_u16(out, meta.name.len() as u16);
    put_u16(out, if large.is_empty() { 0 } else { 4 + 8 * large.len() as u16 });
    put_u16(out, 0); // comment length
    put_u16(out, 0); // disk where the entry starts
    put_u16(out, 0); // internal attributes
    put_u32(out, EXTERNAL_ATTRIBUTES);
    put_u32(out, classic(entry.offset));
    out.extend_from_slice(meta.name.as_bytes());
    if !large.is_empty() {
        put_u16(out, ZIP64_EXTRA_TAG);
        put_u16(out, 8 * large.len() as u16);
        for value in large {
            put_u64(out, value);
        }
    }
}

/// The run both headers share: version needed, flags, method, time, date, CRC-32.
fn put_common_fields(meta: &EntryMeta, zip64: bool, out: &mut Vec<u8>) {
    put_u16(out, if zip64 { VERSION_ZIP64 } else { VERSION_DEFAULT });
    put_u16(out, FLAG_UTF8);
    put_u16(out, meta.method.code());
    put_u16(out, DOS_TIME);
    put_u16(out, DOS_DATE);
    put_u32(out, meta.crc32);
}

fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, size: u64, compressed_size: u64) -> EntryMeta {
        EntryMeta { name: name.into(), method: Method::Stored, crc32: 0x1234_5678, compressed_size, size }
    }

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([bytes[at], bytes[at + 1]])
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
    }

    #[test]
    fn small_entry_has_classic_headers_with_crc_and_sizes() {
        let mut zip = ZipWriter::new();
        let mut out = Vec::new();
        zip.add_entry(meta("a/b", 3, 3), b"xyz", &mut out).expect("written");
        assert_eq!(u32_at(&out, 0), 0x0403_4b50);
        assert_eq!(u16_at(&out, 6), FLAG_UTF8, "bit 3 clear, bit 11 set");
        assert_eq!((u16_at(&out, 10), u16_at(&out, 12)), (DOS_TIME, DOS_DATE));
        assert_eq!((u32_at(&out, 14), u32_at(&out, 18), u32_at(&out, 22)), (0x1234_5678, 3, 3));
        assert_eq!(u16_at(&out, 28), 0, "no extra field");
        assert_eq!(&out[30..36], b"a/bxyz");
        let local_len = out.len();
        zip.finish().write_end(&mut out);
        let central = &out[local_len..];
        assert_eq!(u32_at(central, 0), 0x0201_4b50);
        assert_eq!(u16_at(central, 4), MADE_BY_UNIX);
        assert_eq!(u32_at(central, 38), 0o100644 << 16);
        assert_eq!(u32_at(central, 42), 0, "local header offset");
        let end = &central[46 + 3..];
        assert_eq!(u32_at(end, 0), 0x0605_4b50, "no ZIP64 records");
        assert_eq!((u16_at(end, 10), u32_at(end, 12), u32_at(end, 16)), (1, 49, local_len as u32));
    }

    #[test]
    fn large_sizes_use_zip64_in_local_and_central_headers() {
        let mut zip = ZipWriter::new();
        let mut out = Vec::new();
        let big = 5 << 30;
        zip.begin_entry(meta("big", big, big), &mut out).expect("header");
        assert_eq!(u16_at(&out, 4), VERSION_ZIP64);
        assert_eq!((u32_at(&out, 18), u32_at(&out, 22)), (u32::MAX, u32::MAX));
        assert_eq!((u16_at(&out, 28), u16_at(&out, 33), u16_at(&out, 35)), (20, 1, 16));
        assert_eq!((u64_at(&out, 37), u64_at(&out, 45)), (big, big));
        let header_len = out.len() as u64;
        out.clear();
        zip.add_entry(meta("next", 1, 1), b"!", &mut out).expect("second entry");
        assert_eq!(u16_at(&out, 4), VERSION_DEFAULT, "a small entry stays classic");
        out.clear();
        let mut central = zip.finish();
        assert!(central.write_next(&mut out));
        assert_eq!((u32_at(&out, 20), u32_at(&out, 24)), (u32::MAX, u32::MAX));
        assert_eq!(u16_at(&out, 30), 4 + 16, "sizes only: the offset fits");
        assert_eq!((u64_at(&out, 46 + 3 + 4), u64_at(&out, 46 + 3 + 12)), (big, big));
        out.clear();
        assert!(central.write_next(&mut out));
        assert_eq!(u32_at(&out, 42), u32::MAX, "the second entry starts past 4 GiB");
        assert_eq!(u16_at(&out, 30), 4 + 8);
        assert_eq!(u64_at(&out, 46 + 4 + 4), header_len + big);
    }

    #[test]
    fn zip64_end_records_from_65535_entries() {
        for (count, zip64) in [(65_534, false), (65_535, true)] {
            let mut zip = ZipWriter::new();
            let mut out = Vec::new();
            for _ in 0..count {
                zip.add_entry(meta("e", 0, 0), b"", &mut out).expect("entry");
            }
            let entries_end = out.len();
            zip.finish().write_end(&mut out);
            let eocd = &out[out.len() - 22..];
            assert_eq!(u32_at(eocd, 0), 0x0605_4b50);
            let cd_size = out.len() - 22 - entries_end - if zip64 { 76 } else { 0 };
            if zip64 {
                assert_eq!(u16_at(eocd, 10), 0xFFFF);
                let locator = &out[out.len() - 42..];
                assert_eq!(u32_at(locator, 0), 0x0706_4b50);
                let record_at = u64_at(locator, 8) as usize;
                assert_eq!(record_at, entries_end + cd_size);
                let record = &out[record_at..];
                assert_eq!(u32_at(record, 0), 0x0606_4b50);
                assert_eq!((u64_at(record, 32), u64_at(record, 40)), (count, cd_size as u64));
                assert_eq!(u64_at(record, 48), entries_end as u64);
            } else {
                assert_eq!(u16_at(eocd, 10), count as u16);
                assert_eq!(u32_at(eocd, 12), cd_size as u32);
            }
        }
    }

    #[test]
    fn overlong_names_are_refused() {
        let mut zip = ZipWriter::new();
        let name = "x".repeat(70_000);
        let mut out = Vec::new();
        assert!(matches!(zip.begin_entry(meta(&name, 0, 0), &mut out), Err(ZipError::NameTooLong(_))));
        assert!(out.is_empty());
    }
}
