//! Phone numbers: strict E.164 syntax, numbering-plan validity, number type, region and the
//! recipient's possible time zones.
//!
//! The numbering-plan library (`rlibphonenumber`, a port of Google's libphonenumber with its full
//! metadata) stays behind this module, so that it can be swapped. Time zones come from
//! libphonenumber's prefix map, generated into `data/prefix_timezones.tsv` by
//! `scripts/gen_tzdata.py`.
//!
//! ```
//! let n = callgate::phone::parse_e164("+14155550123").unwrap();
//! assert_eq!(n.region.as_deref(), Some("US"));
//! assert_eq!(callgate::phone::mask("+14155550123"), "+1415***0123");
//! ```

use std::collections::HashMap;
use std::sync::LazyLock;

use jiff::tz::TimeZone;
use rlibphonenumber::{PHONE_NUMBER_UTIL, PhoneNumberType};
use serde::{Deserialize, Serialize};

/// What kind of line a number is, by its numbering plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumberType {
    FixedLine,
    Mobile,
    FixedLineOrMobile,
    TollFree,
    PremiumRate,
    SharedCost,
    Voip,
    PersonalNumber,
    Pager,
    Uan,
    Voicemail,
    Unknown,
}

impl NumberType {
    /// The snake_case name used in policies and messages.
    pub fn as_str(self) -> &'static str {
        use NumberType::*;
        match self {
            FixedLine => "fixed_line",
            Mobile => "mobile",
            FixedLineOrMobile => "fixed_line_or_mobile",
            TollFree => "toll_free",
            PremiumRate => "premium_rate",
            SharedCost => "shared_cost",
            Voip => "voip",
            PersonalNumber => "personal_number",
            Pager => "pager",
            Uan => "uan",
            Voicemail => "voicemail",
            Unknown => "unknown",
        }
    }
}

impl From<PhoneNumberType> for NumberType {
    fn from(t: PhoneNumberType) -> Self {
        match t {
            PhoneNumberType::FixedLine => NumberType::FixedLine,
            PhoneNumberType::Mobile => NumberType::Mobile,
            PhoneNumberType::FixedLineOrMobile => NumberType::FixedLineOrMobile,
            PhoneNumberType::TollFree => NumberType::TollFree,
            PhoneNumberType::PremiumRate => NumberType::PremiumRate,
            PhoneNumberType::SharedCost => NumberType::SharedCost,
            PhoneNumberType::VoIP => NumberType::Voip,
            PhoneNumberType::PersonalNumber => NumberType::PersonalNumber,
            PhoneNumberType::Pager => NumberType::Pager,
            PhoneNumberType::UAN => NumberType::Uan,
            PhoneNumberType::VoiceMail => NumberType::Voicemail,
            PhoneNumberType::Unknown => NumberType::Unknown,
        }
    }
}

/// A number that passed [`parse_e164`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Number {
    /// The number exactly as given, which is also its canonical E.164 form.
    pub e164: String,
    /// The country calling code (`1` for NANP).
    pub country_code: u32,
    /// The ISO 3166-1 region the number belongs to (`US`), if it maps to one.
    pub region: Option<String>,
    /// The line type.
    pub number_type: NumberType,
}

/// Why a string is not an acceptable phone number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("is not E.164 (a '+' then 8 to 15 digits, no spaces or punctuation)")]
    Syntax,
    #[error("is not a valid number in its numbering plan")]
    Invalid,
}

/// Parse a number that must already be in canonical E.164 form and valid in its numbering plan.
pub fn parse_e164(input: &str) -> Result<Number, PhoneError> {
    let digits = input.strip_prefix('+').ok_or(PhoneError::Syntax)?;
    if !(8..=15).contains(&digits.len())
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || digits.starts_with('0')
    {
        return Err(PhoneError::Syntax);
    }
    let parsed = PHONE_NUMBER_UTIL
        .parse(input, None)
        .map_err(|_| PhoneError::Invalid)?;
    // Valid in its numbering plan: it has a line type. (`is_valid_number` is exactly this, the
    // region and the type looked up once more: the region's metadata is the number's country
    // code's, so the check it adds always holds. The verdicts are compared with it in tests.)
    let number_type = NumberType::from(PHONE_NUMBER_UTIL.get_number_type(&parsed));
    if number_type == NumberType::Unknown {
        return Err(PhoneError::Invalid);
    }
    // A valid number whose canonical form differs (e.g. an Italian leading zero issue) is not
    // what the caller meant to send.
    if PHONE_NUMBER_UTIL.format(&parsed, rlibphonenumber::PhoneNumberFormat::E164) != input {
        return Err(PhoneError::Invalid);
    }
    Ok(Number {
        e164: input.to_string(),
        country_code: u32::try_from(parsed.country_code).unwrap_or(0),
        region: PHONE_NUMBER_UTIL
            .get_region_for_number(&parsed)
            .map(|r| r.to_string()),
        number_type,
    })
}

/// Mask a phone number for logs: country code and area digits, then `***`, then the last four
/// digits (`+14155550123` -> `+1415***0123`). Short or odd inputs are masked further.
pub fn mask(number: &str) -> String {
    let count = number.chars().count();
    if count < 10 {
        return "***".to_string();
    }
    // Byte offsets of the fifth character's end and of the last four's start.
    let at = |n: usize| {
        number
            .char_indices()
            .nth(n)
            .map_or(number.len(), |(i, _)| i)
    };
    let (head, tail) = (&number[..at(5)], &number[at(count - 4)..]);
    let mut masked = String::with_capacity(head.len() + 3 + tail.len());
    masked.push_str(head);
    masked.push_str("***");
    masked.push_str(tail);
    masked
}

struct ZoneMap {
    by_prefix: HashMap<&'static str, Vec<TimeZone>>,
    longest: usize,
}

static ZONES: LazyLock<ZoneMap> = LazyLock::new(|| {
    let mut cache: HashMap<&str, TimeZone> = HashMap::new();
    let mut by_prefix = HashMap::new();
    let mut longest = 0;
    for line in include_str!("../data/prefix_timezones.tsv").lines() {
        let Some((prefix, zones)) = line.split_once('\t') else {
            continue;
        };
        if line.starts_with('#') {
            continue;
        }
        let zones: Vec<TimeZone> = zones
            .split(',')
            .filter_map(|name| {
                if let Some(tz) = cache.get(name) {
                    return Some(tz.clone());
                }
                let tz = TimeZone::get(name).ok()?;
                cache.insert(name, tz.clone());
                Some(tz)
            })
            .collect();
        if !zones.is_empty() {
            longest = longest.max(prefix.len());
            by_prefix.insert(prefix, zones);
        }
    }
    ZoneMap { by_prefix, longest }
});

/// The time zones a number may ring in, by libphonenumber's longest matching prefix. Several zones
/// mean the prefix alone does not decide (a whole country, or an area code across a zone line); an
/// empty slice means no zone is known.
pub fn time_zones(e164: &str) -> &'static [TimeZone] {
    let digits = e164.trim_start_matches('+');
    let zones = &*ZONES;
    let max = zones.longest.min(digits.len());
    for len in (1..=max).rev() {
        if let Some(found) = zones.by_prefix.get(&digits[..len]) {
            return found;
        }
    }
    &[]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_numbers_with_their_region_and_type() {
        let us = parse_e164("+14155550123").unwrap();
        assert_eq!(us.country_code, 1);
        assert_eq!(us.region.as_deref(), Some("US"));
        assert_eq!(us.number_type, NumberType::FixedLineOrMobile);
        let gb = parse_e164("+447400123456").unwrap();
        assert_eq!(gb.region.as_deref(), Some("GB"));
        assert_eq!(gb.number_type, NumberType::Mobile);
        let toll_free = parse_e164("+18005551234").unwrap();
        assert_eq!(toll_free.number_type, NumberType::TollFree);
        let premium = parse_e164("+19005550123").unwrap();
        assert_eq!(premium.number_type, NumberType::PremiumRate);
    }

    #[test]
    fn rejects_bad_syntax() {
        for bad in [
            "14155550123",
            "+1 415 555 0123",
            "+1-415-555-0123",
            "+0123456789",
            "+1415",
            "+1234567890123456",
            "",
            "+",
            "+1415555012a",
            "＋14155550123",
        ] {
            assert_eq!(parse_e164(bad), Err(PhoneError::Syntax), "{bad}");
        }
    }

    #[test]
    fn rejects_numbers_invalid_in_their_plan() {
        // Area code 011 does not exist; country code 999 is unassigned; too short for GB.
        for bad in ["+10115550123", "+99912345678", "+4474001234"] {
            assert_eq!(parse_e164(bad), Err(PhoneError::Invalid), "{bad}");
        }
    }

    /// The verdict as libphonenumber's `is_valid_number` gives it, which `parse_e164` no longer
    /// calls (it derives validity from the line type it looks up anyway).
    fn valid_by_the_library(input: &str) -> bool {
        PHONE_NUMBER_UTIL.parse(input, None).is_ok_and(|parsed| {
            PHONE_NUMBER_UTIL.is_valid_number(&parsed)
                && PHONE_NUMBER_UTIL.format(&parsed, rlibphonenumber::PhoneNumberFormat::E164)
                    == input
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4_000))]
        /// Valid exactly when the library's `is_valid_number` says so: numbers in plans with
        /// regions (NANP, GB, DE, IN, JP, AU, BR), non-geographic codes (+800, +882, +883, +979)
        /// and unassigned ones, of every length E.164 allows.
        #[test]
        fn validity_is_the_librarys(
            code in proptest::sample::select(vec![
                "1", "44", "49", "91", "81", "61", "55", "800", "882", "883", "979", "999", "7",
                "86",
            ]),
            rest in "[0-9]{6,12}",
        ) {
            let input = format!("+{code}{rest}");
            proptest::prop_assume!(input.len() <= 16);
            let ours = parse_e164(&input).is_ok();
            proptest::prop_assert_eq!(ours, valid_by_the_library(&input), "{}", input);
        }
    }

    #[test]
    fn validity_is_the_librarys_on_known_numbers() {
        for number in [
            "+14155550123",
            "+18005551234",
            "+447400123456",
            "+80012345678",
            "+10115550123",
            "+99912345678",
            "+4474001234",
        ] {
            assert_eq!(
                parse_e164(number).is_ok(),
                valid_by_the_library(number),
                "{number}"
            );
        }
        // Both verdicts occur among them.
        assert!(parse_e164("+80012345678").is_ok());
        assert!(parse_e164("+4474001234").is_err());
    }

    #[test]
    fn masks_the_middle_digits() {
        assert_eq!(mask("+14155550123"), "+1415***0123");
        assert_eq!(mask("+4479"), "***");
        // Counted in characters, not bytes.
        assert_eq!(mask("+1415555012\u{e9}"), "+1415***012\u{e9}");
        assert_eq!(
            mask("\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}"),
            "***"
        );
    }

    #[test]
    fn finds_zones_by_longest_prefix() {
        let sf: Vec<_> = time_zones("+14155550123")
            .iter()
            .map(|z| z.iana_name().unwrap())
            .collect();
        assert_eq!(sf, ["America/Los_Angeles"]);
        let ny: Vec<_> = time_zones("+12125550123")
            .iter()
            .map(|z| z.iana_name().unwrap())
            .collect();
        assert_eq!(ny, ["America/New_York"]);
        assert!(!time_zones("+447400123456").is_empty());
    }
}
