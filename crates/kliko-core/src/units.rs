//! Sizes and durations as people read and write them, shared by the command line, pipeline
//! files and the web pages.

/// `1536` → `1.5 KiB`; bytes below 1 KiB exactly.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `850` → `850 ms`, `1234` → `1.2 s`, `125000` → `2m 05s`.
pub fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        let s = ms / 1000;
        format!("{}m {:02}s", s / 60, s % 60)
    }
}

/// A duration as people write it, the one grammar of every kliko option and pipeline field
/// that takes one: a number (fractions allowed), then `ms`, `s`, `m`, `h` or `d`, or no unit
/// for seconds: `500ms`, `90s`, `1.5`, `10m`, `2h`, `30d`. Zero is a duration; whether it
/// makes sense is the caller's business. The error says what was wrong, in the user's terms.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, secs) = [("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0)]
        .iter()
        .find_map(|(unit, secs)| t.strip_suffix(unit).map(|n| (n, *secs)))
        .unwrap_or((t, 1.0));
    let bad = || format!("`{s}` is not a duration (examples: `500ms`, `90s`, `10m`, `2h`, `30d`)");
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    std::time::Duration::try_from_secs_f64(n * secs).map_err(|_| format!("`{s}` is too long a duration"))
}

/// A size as people write it, the one grammar of every kliko option and pipeline field that
/// takes one: a number (fractions allowed), then an optional binary unit `K`, `M`, `G`, `T`
/// or `P` (any case, with or without `B` or `iB`: `4G`, `4gb` and `4GiB` are all 2^32 bytes),
/// or no unit for bytes: `100000`, `512M`, `1.5G`. Zero is a size; whether it makes sense is
/// the caller's business. The error says what was wrong, in the user's terms.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a size (examples: `512M`, `4G`, `1.5T`, `100000` bytes)");
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("ib").or_else(|| t.strip_suffix('b')).unwrap_or(&t);
    let (num, shift) = [('k', 10), ('m', 20), ('g', 30), ('t', 40), ('p', 50)]
        .iter()
        .find_map(|(unit, shift)| t.strip_suffix(*unit).map(|n| (n, *shift)))
        .unwrap_or((t, 0));
    let num = num.trim();
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    let bytes = n * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("`{s}` is too large a size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_every_unit() {
        let z = |s| parse_size(s).unwrap();
        assert_eq!(z("1000"), 1000);
        assert_eq!(z("0"), 0);
        assert_eq!(z("64kb"), 64 << 10);
        assert_eq!(z("512m"), 512 << 20);
        assert_eq!(z("500M"), 500 << 20);
        assert_eq!(z("4G"), 4 << 30);
        assert_eq!(z("1gb"), 1 << 30);
        assert_eq!(z("1GiB"), 1 << 30);
        assert_eq!(z(" 1.5G "), 3 << 29);
        assert_eq!(z("2T"), 2 << 40);
        assert_eq!(z("1P"), 1 << 50);
        assert_eq!(z("10b"), 10);
        for bad in ["", "G", "lots", "1X", "-1G", "1e3", "nan", "1..5G", "1 2G", "0x10"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("not a size"), "{bad}: {e}");
        }
        assert!(parse_size("99999999P").unwrap_err().contains("too large"));
    }

    #[test]
    fn readable() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_ms(850), "850 ms");
        assert_eq!(human_ms(1234), "1.2 s");
        assert_eq!(human_ms(125_000), "2m 05s");
    }

    #[test]
    fn durations_in_every_unit() {
        use std::time::Duration;
        let d = |s| parse_duration(s).unwrap();
        assert_eq!(d("1ms"), Duration::from_millis(1));
        assert_eq!(d("1.5"), Duration::from_millis(1500));
        assert_eq!(d("90s"), Duration::from_secs(90));
        assert_eq!(d(" 2m "), Duration::from_secs(120));
        assert_eq!(d("2h"), Duration::from_secs(7200));
        assert_eq!(d("30d"), Duration::from_secs(30 * 86400));
        assert_eq!(d("0s"), Duration::ZERO);
        assert_eq!(d("0"), Duration::ZERO);
        for bad in ["", "s", "ms", "-1", "-1s", "1x", "nan", "inf", "1e400", "2 weeks"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("duration"), "{bad}: {e}");
        }
    }
}
