//! Time-based one-time passwords (RFC 6238 over RFC 4226): the second factor of local users.
//! SHA-1, 6 digits, 30 s steps, as every authenticator app reads from an `otpauth://` URI;
//! a code is accepted one step early or late (clock drift) and never twice.

use ring::hmac;

/// Seconds per step.
pub const STEP: u64 = 30;
const DIGITS: u32 = 6;
/// Secrets are 20 random bytes (160 bits, RFC 4226's recommendation).
pub const SECRET_LEN: usize = 20;

/// The code for `counter` (RFC 4226 HOTP).
pub fn hotp(secret: &[u8], counter: u64) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, &counter.to_be_bytes());
    let mac = tag.as_ref();
    let offset = (mac[mac.len() - 1] & 0x0f) as usize;
    let bin = u32::from_be_bytes([
        mac[offset] & 0x7f,
        mac[offset + 1],
        mac[offset + 2],
        mac[offset + 3],
    ]);
    bin % 10u32.pow(DIGITS)
}

/// The step a code for `secret` at Unix time `now` matches, if any, later than `after`
/// (the step of the last code accepted: a code works once).
pub fn verify(secret: &[u8], code: &str, now: u64, after: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let want: u32 = code.parse().ok()?;
    let t = now / STEP;
    let mut hit = None;
    // Check every candidate (no early exit), so timing does not tell which step matched.
    for step in [t.saturating_sub(1), t, t + 1] {
        let same = hotp(secret, step) ^ want == 0;
        if same && step > after && hit.is_none() {
            hit = Some(step);
        }
    }
    hit
}

/// RFC 4648 base32 without padding (what authenticator apps take).
pub fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in data {
        buf = (buf << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// Base32 (case and padding ignored) -> bytes.
pub fn from_base32(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in text.trim().trim_end_matches('=').chars() {
        let v = match c.to_ascii_uppercase() {
            c @ 'A'..='Z' => c as u32 - 'A' as u32,
            c @ '2'..='7' => c as u32 - '2' as u32 + 26,
            ' ' | '-' => continue,
            _ => return None,
        };
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            out.push((buf >> (bits - 8)) as u8);
            bits -= 8;
        }
        buf &= (1 << bits) - 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_sha1_vectors() {
        // RFC 6238 appendix B, SHA-1 (the 8-digit values, taken mod 10^6).
        let secret = b"12345678901234567890";
        for (t, code8) in [
            (59u64, 94287082u32),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ] {
            assert_eq!(hotp(secret, t / STEP), code8 % 1_000_000, "t = {t}");
        }
    }

    #[test]
    fn codes_work_once_and_near_now() {
        let secret = b"12345678901234567890";
        let now = 1_111_111_111;
        let code = format!("{:06}", hotp(secret, now / STEP));
        let step = verify(secret, &code, now, 0).unwrap();
        assert_eq!(step, now / STEP);
        assert_eq!(verify(secret, &code, now, step), None, "replayed");
        assert!(
            verify(secret, &code, now + STEP, 0).is_some(),
            "one step late"
        );
        assert_eq!(verify(secret, &code, now + 3 * STEP, 0), None, "too late");
        assert_eq!(verify(secret, "12345", now, 0), None);
        assert_eq!(verify(secret, "abcdef", now, 0), None);
    }

    #[test]
    fn base32_round_trips() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(from_base32("mzxw6ytboi======").unwrap(), b"foobar");
        let s = [7u8; SECRET_LEN];
        assert_eq!(from_base32(&base32(&s)).unwrap(), s);
        assert!(from_base32("not base32!").is_none());
    }
}
