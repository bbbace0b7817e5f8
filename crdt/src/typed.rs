//! The text spellings of the Automerge scalars JSON has no type for: a timestamp as ISO 8601
//! text (what JavaScript's `Date.prototype.toJSON` prints and `Date.parse` reads, so a
//! document reads the same from automerge-js and from the API) and bytes as base64.
//! Pure functions, no IO.

/// JavaScript's `Date` range: ±100,000,000 days from the epoch, in milliseconds.
const JS_DATE_LIMIT: i64 = 8_640_000_000_000_000;

const MS_PER_DAY: i64 = 86_400_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01: (year, month 1-12, day 1-31).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// Unix milliseconds as JavaScript's `toISOString` prints them (`2026-12-06T05:17:45.000Z`;
/// years outside 0-9999 as `+012345`/`-000001`); `None` outside `Date`'s range.
pub fn format_timestamp(ms: i64) -> Option<String> {
    if !(-JS_DATE_LIMIT..=JS_DATE_LIMIT).contains(&ms) {
        return None;
    }
    let (days, in_day) = (ms.div_euclid(MS_PER_DAY), ms.rem_euclid(MS_PER_DAY));
    let (y, mo, d) = civil_from_days(days);
    let year = if (0..=9999).contains(&y) {
        format!("{y:04}")
    } else {
        format!("{}{:06}", if y < 0 { '-' } else { '+' }, y.abs())
    };
    let (h, mi, s, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    Some(format!(
        "{year}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z"
    ))
}

/// Parses an RFC 3339 date-time (`2026-12-06T05:17:45Z`, fractions of a second to any
/// precision, kept to the millisecond; `Z` or an offset such as `+01:00`; a year may be
/// written `+012345` as JavaScript does) into unix milliseconds. `None` if it is not one, or
/// outside `Date`'s range.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |s: &[u8]| -> Option<i64> {
        if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(s).ok()?.parse().ok()
    };
    let (year, rest) = match b.first()? {
        sign @ (b'+' | b'-') => {
            let y = num(b.get(1..7)?)?;
            (if *sign == b'-' { -y } else { y }, b.get(7..)?)
        }
        _ => (num(b.get(..4)?)?, b.get(4..)?),
    };
    // -MM-DDTHH:MM:SS
    if rest.len() < 15
        || rest[0] != b'-'
        || rest[3] != b'-'
        || !matches!(rest[6], b'T' | b't' | b' ')
        || rest[9] != b':'
        || rest[12] != b':'
    {
        return None;
    }
    let (mo, d) = (num(&rest[1..3])?, num(&rest[4..6])?);
    let (h, mi, s) = (num(&rest[7..9])?, num(&rest[10..12])?, num(&rest[13..15])?);
    let month_days = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let max_day = match mo {
        2 if leap => 29,
        1..=12 => month_days[(mo - 1) as usize],
        _ => return None,
    };
    if !(1..=max_day).contains(&d) || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let mut rest = &rest[15..];
    let mut milli = 0;
    if let Some(frac) = rest.strip_prefix(b".") {
        let digits = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let mut first3 = frac[..digits.min(3)].to_vec();
        first3.resize(3, b'0');
        milli = num(&first3)?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), hh @ ..] if hh.len() == 5 && hh[2] == b':' => {
            let (oh, om) = (num(&hh[..2])?, num(&hh[3..])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let m = oh * 60 + om;
            if *sign == b'-' { -m } else { m }
        }
        _ => return None,
    };
    let ms = days_from_civil(year, mo, d) * MS_PER_DAY
        + ((h * 60 + mi - offset_min) * 60 + s) * 1000
        + milli;
    (-JS_DATE_LIMIT..=JS_DATE_LIMIT).contains(&ms).then_some(ms)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn encode_base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard or URL-safe base64, padded or not; `None` if `text` is not base64.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_javascript_does() {
        assert_eq!(format_timestamp(0).unwrap(), "1970-01-01T00:00:00.000Z");
        // new Date(1796534265123).toISOString()
        assert_eq!(
            format_timestamp(1_796_534_265_123).unwrap(),
            "2026-12-06T05:17:45.123Z"
        );
        assert_eq!(format_timestamp(-1).unwrap(), "1969-12-31T23:59:59.999Z");
        // new Date(-62198755200000).toISOString(): year 0 is 0000; year -1 is -000001.
        assert_eq!(
            format_timestamp(-62_198_755_200_000).unwrap(),
            "-000001-01-01T00:00:00.000Z"
        );
        assert_eq!(
            format_timestamp(JS_DATE_LIMIT).unwrap(),
            "+275760-09-13T00:00:00.000Z"
        );
        assert_eq!(format_timestamp(JS_DATE_LIMIT + 1), None);
        assert_eq!(format_timestamp(i64::MIN), None);
    }

    #[test]
    fn timestamps_parse_back_and_bad_ones_are_refused() {
        for ms in [
            0,
            1,
            -1,
            1_796_534_265_123,
            951_782_400_000, // 2000-02-29
            -62_198_755_200_000,
            JS_DATE_LIMIT,
            -JS_DATE_LIMIT,
        ] {
            let text = format_timestamp(ms).unwrap();
            assert_eq!(parse_timestamp(&text), Some(ms), "{text}");
        }
        assert_eq!(
            parse_timestamp("2026-12-06T06:17:45.1234567+01:00"),
            Some(1_796_534_265_123)
        );
        assert_eq!(
            parse_timestamp("2026-12-06T05:17:45Z"),
            Some(1_796_534_265_000)
        );
        for bad in [
            "",
            "2026",
            "2026-12-06",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-12-06T24:00:00Z",
            "2026-12-06T05:17:45",
            "2026-12-06T05:17:45.Z",
            "2026-12-06T05:17:45+1:00",
            "+275760-09-13T00:00:00.001Z",
            "２０２６-12-06T05:17:45Z",
            "1970-01-01T00:00:00Zjunk",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn base64_round_trips() {
        for n in 0..40u8 {
            let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            let text = encode_base64(&bytes);
            assert_eq!(decode_base64(&text).unwrap(), bytes);
            assert_eq!(decode_base64(text.trim_end_matches('=')).unwrap(), bytes);
        }
        assert_eq!(encode_base64(b"hi!?"), "aGkhPw==");
        assert_eq!(decode_base64("a"), None);
        assert_eq!(decode_base64("a*=="), None);
    }
}
