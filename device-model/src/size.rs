//! Parsing byte sizes such as `64GiB`, `512M` or `1000000` from the command line.

/// Parses a size: a whole number, optionally followed by `K`, `M`, `G`, `T` (powers of 1024,
/// with or without `iB`/`B`) or `KB`, `MB`, `GB`, `TB` (powers of 1000). Case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("'{text}' is not a size (expected e.g. 64GiB, 512M or 1048576)"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("'{text}' is too large"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(format!("'{text}' has an unknown unit '{other}'")),
    };
    n.checked_mul(multiplier).ok_or_else(|| format!("'{text}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64GiB"), Ok(64 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("2 TB"), Ok(2_000_000_000_000));
        assert_eq!(parse_size("1K"), Ok(1024));
    }

    #[test]
    fn nonsense() {
        for bad in ["", "GiB", "-1", "1.5G", "12 parsecs", "99999999999999999999", "20000000T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
