//! The two text encodings the job API needs and nothing more: base64 for
//! payloads that are not JSON, and RFC 3339 UTC instants for `_at` fields.
//! Hand-written (about a hundred lines with their tests) rather than two
//! crates for two functions each.

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648 §4) with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        let sextet = |shift: u32| char::from(BASE64_ALPHABET[((n >> shift) & 63) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

fn base64_value(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Standard base64, padded or not (clients differ); `None` for anything
/// else: another alphabet, whitespace, padding in the middle.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let data = bytes
        .strip_suffix(b"==")
        .or_else(|| bytes.strip_suffix(b"="))
        .unwrap_or(bytes);
    // Padding only completes the last group to 4 characters; a group of
    // one character carries no whole byte.
    let (padding, rest) = (bytes.len() - data.len(), data.len() % 4);
    if rest == 1 || (padding > 0 && rest + padding != 4) {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / 4 * 3 + 2);
    for group in data.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in group.iter().enumerate() {
            n |= base64_value(c)? << (18 - 6 * i);
        }
        // A group of k characters carries k - 1 whole bytes.
        out.extend_from_slice(&n.to_be_bytes()[1..group.len()]);
    }
    Some(out)
}

const MS_PER_DAY: i64 = 86_400_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day since 1970-01-01 (Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `2026-12-04T10:00:00Z`, with `.mmm` before the `Z` when the instant has
/// milliseconds.
pub fn format_rfc3339(unix_ms: u64) -> String {
    let mut text = Vec::with_capacity(RFC3339_MS_LEN);
    write_rfc3339(&mut text, unix_ms);
    // Only ASCII was written.
    String::from_utf8_lossy(&text).into_owned()
}

/// The length of `2026-12-04T10:00:00.000Z`.
const RFC3339_MS_LEN: usize = 24;

/// [`format_rfc3339`]'s text appended to `out`: job answers write theirs
/// straight into the body.
pub fn write_rfc3339(out: &mut Vec<u8>, unix_ms: u64) {
    let ms = i64::try_from(unix_ms).unwrap_or(i64::MAX);
    let (year, month, day) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    let in_day = ms.rem_euclid(MS_PER_DAY);
    let (hour, minute) = (in_day / 3_600_000, in_day / 60_000 % 60);
    let (second, milli) = (in_day / 1000 % 60, in_day % 1000);
    if !(0..=9999).contains(&year) {
        // Beyond four digits: rare enough for the formatting machinery.
        let mut text = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}");
        if milli != 0 {
            text.push_str(&format!(".{milli:03}"));
        }
        text.push('Z');
        out.extend_from_slice(text.as_bytes());
        return;
    }
    // Digit by digit into a fixed buffer: every job answer writes two to
    // five of these, and the formatting machinery took about 7 % of the
    // server's CPU in a batch enqueue (perf).
    let mut text = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], i64::from(month));
    put_digits(&mut text[8..10], i64::from(day));
    put_digits(&mut text[11..13], hour);
    put_digits(&mut text[14..16], minute);
    put_digits(&mut text[17..19], second);
    if milli != 0 {
        put_digits(&mut text[20..23], milli);
        out.extend_from_slice(&text);
    } else {
        out.extend_from_slice(&text[..19]);
        out.push(b'Z');
    }
}

/// `value` (0 ≤ value < 10^len) as exactly `digits.len()` decimal digits.
fn put_digits(digits: &mut [u8], mut value: i64) {
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Milliseconds since the Unix epoch (negative before it) of an RFC 3339
/// date-time: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; `t`, `z` and a
/// space for `T` are accepted as RFC 3339 allows. Fractions finer than a
/// millisecond are cut; a leap second counts as the second after.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        part.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let at = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (i64::from(digits(0..4)?), digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut milli = 0i64;
    if at(i, b".") {
        let start = i + 1;
        i = start;
        while at(i, b"0123456789") {
            i += 1;
        }
        if i == start {
            return None;
        }
        let mut scale = 100;
        for &c in &b[start..i.min(start + 3)] {
            milli += i64::from(c - b'0') * scale;
            scale /= 10;
        }
    }
    let offset_minutes = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && at(i + 3, b":") => {
            let (h, m) = (digits(i + 1..i + 3)?, digits(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            let minutes = i64::from(h * 60 + m);
            if *sign == b'-' {
                -minutes
            } else {
                minutes
            }
        }
        _ => return None,
    };
    let seconds = days_from_civil(year, month, day) * 86_400
        + i64::from(hour * 3600 + minute * 60 + second)
        - offset_minutes * 60;
    Some(seconds * 1000 + milli)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_rfc4648() {
        // RFC 4648 §10's test vectors.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
            let unpadded = encoded.trim_end_matches('=');
            assert_eq!(base64_decode(unpadded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        assert_eq!(base64_decode("+/+/").unwrap(), vec![0xfb, 0xff, 0xbf]);
        for bad in [
            "Z",
            "Zg=",
            "Zg===",
            "Z=g=",
            "Zm9v YmFy",
            "Zm9v\n",
            "-_-_",
            "Zg==Zg==",
        ] {
            assert_eq!(base64_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rfc3339_formats_and_parses() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_rfc3339(253_402_300_799_999),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(format_rfc3339(253_402_300_800_000), "10000-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_000), "1970-01-01T00:00:01Z");
        assert_eq!(format_rfc3339(61_010), "1970-01-01T00:01:01.010Z");
        assert_eq!(format_rfc3339(1_796_378_400_000), "2026-12-04T10:00:00Z");
        assert_eq!(format_rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            format_rfc3339(4_107_542_399_999),
            "2100-02-28T23:59:59.999Z"
        );
        for ms in [0u64, 1, 999, 86_399_999, 951_782_400_123, 1_796_378_400_000] {
            assert_eq!(parse_rfc3339(&format_rfc3339(ms)), Some(ms as i64), "{ms}");
        }
        assert_eq!(
            parse_rfc3339("2026-12-04T11:30:00+01:30"),
            Some(1_796_378_400_000)
        );
        assert_eq!(
            parse_rfc3339("2026-12-04t05:00:00.5-05:00"),
            Some(1_796_378_400_500)
        );
        assert_eq!(
            parse_rfc3339("2026-12-04 10:00:00.123456789z"),
            Some(1_796_378_400_123)
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Some(-1000));
        for bad in [
            "",
            "2026-12-04",
            "2026-12-04T10:00:00",
            "2026-13-04T10:00:00Z",
            "2026-02-29T10:00:00Z",
            "2026-12-04T24:00:00Z",
            "2026-12-04T10:00:00.Z",
            "2026-12-04T10:00:00+0100",
            "2026-12-04T10:00:00Zjunk",
            "2026-12-04X10:00:00Z",
            "+026-12-04T10:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
