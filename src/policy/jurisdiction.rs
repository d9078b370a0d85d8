//! Where a number rings, for the jurisdiction packs: its country from the numbering plan, and for
//! the US and Canada its state or province from the area code; and the legal holidays there.
//!
//! Area codes come from libphonenumber's geocoding data, generated into `data/nanp_regions.tsv`
//! by `scripts/gen_regions.py` (Apache-2.0); holidays from PyPI's `holidays` package, generated
//! into `data/holidays.tsv` by `scripts/gen_holidays.py` (MIT; the years are in its header).

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use jiff::civil::Date;

use crate::phone::Number;

/// A number's jurisdiction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jurisdiction {
    /// ISO 3166-1 alpha-2 (`US`), or `001` for non-geographic numbers.
    pub country: String,
    /// ISO 3166-2 (`US-FL`, `CA-ON`), where the number tells it.
    pub subdivision: Option<&'static str>,
}

static NANP: LazyLock<HashMap<&'static str, &'static str>> = LazyLock::new(|| {
    include_str!("../../data/nanp_regions.tsv")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('\t'))
        .collect()
});

type HolidayTable = HashMap<&'static str, HashSet<Date>>;

static HOLIDAYS: LazyLock<HolidayTable> = LazyLock::new(|| {
    let mut table: HolidayTable = HashMap::new();
    for line in include_str!("../../data/holidays.tsv").lines() {
        let mut fields = line.split('\t');
        if let (Some(place), Some(date)) = (fields.next(), fields.next())
            && !place.starts_with('#')
            && let Ok(date) = date.parse::<Date>()
        {
            table.entry(place).or_default().insert(date);
        }
    }
    table
});

impl Jurisdiction {
    /// The jurisdiction of a parsed number.
    pub fn of(number: &Number) -> Jurisdiction {
        // US territories have region codes of their own in the numbering plan; US rules reach
        // them as subdivisions of the US.
        let territory = match number.region.as_deref() {
            Some("PR") => Some("US-PR"),
            Some("GU") => Some("US-GU"),
            Some("VI") => Some("US-VI"),
            Some("AS") => Some("US-AS"),
            Some("MP") => Some("US-MP"),
            _ => None,
        };
        if let Some(territory) = territory {
            return Jurisdiction {
                country: "US".into(),
                subdivision: Some(territory),
            };
        }
        let country = number.region.clone().unwrap_or_else(|| "001".into());
        let subdivision = match country.as_str() {
            "US" | "CA" => number
                .e164
                .get(1..5)
                .and_then(|area| NANP.get(area).copied())
                .filter(|s| s.starts_with(country.as_str())),
            _ => None,
        };
        Jurisdiction {
            country,
            subdivision,
        }
    }

    /// Whether a rule written for `region` (a country, or a subdivision) applies here. Where the
    /// number's subdivision is unknown, every subdivision's rule of its country applies: the
    /// strictest rules of the country.
    pub fn is_in(&self, region: &str) -> bool {
        match region.split_once('-') {
            None => region == self.country,
            Some((country, _)) => match self.subdivision {
                Some(s) => s == region,
                None => country == self.country,
            },
        }
    }
}

/// The first and last year the generated holiday table covers.
static COVERED: LazyLock<(i16, i16)> = LazyLock::new(|| {
    let years = HOLIDAYS.values().flatten().map(|d| d.year());
    let (mut first, mut last) = (i16::MAX, i16::MIN);
    for y in years {
        first = first.min(y);
        last = last.max(y);
    }
    (first, last)
});

/// Whether the generated holiday table covers `date`'s year.
pub fn holidays_cover(date: Date) -> bool {
    let (first, last) = *COVERED;
    (first..=last).contains(&date.year())
}

/// Whether `date` is a legal holiday in `region` in the generated table.
pub fn is_listed_holiday(region: &str, date: Date) -> bool {
    HOLIDAYS
        .get(region)
        .is_some_and(|days| days.contains(&date))
}

/// The years the generated holiday table covers, as its header states.
pub fn holiday_years() -> &'static str {
    include_str!("../../data/holidays.tsv")
        .lines()
        .next()
        .and_then(|l| {
            l.split_whitespace()
                .find(|w| w.contains('-') && w.len() == 9)
        })
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::parse_e164;

    fn of(n: &str) -> Jurisdiction {
        Jurisdiction::of(&parse_e164(n).unwrap())
    }

    #[test]
    fn states_and_provinces_come_from_the_area_code() {
        assert_eq!(of("+13055550123").subdivision, Some("US-FL"));
        assert_eq!(of("+12055550123").subdivision, Some("US-AL"));
        assert_eq!(of("+15125550123").subdivision, Some("US-TX"));
        assert_eq!(of("+14165550123").subdivision, Some("CA-ON"));
        assert_eq!(of("+14165550123").country, "CA");
        // Toll-free: the country only.
        let toll_free = of("+18005550199");
        assert_eq!(
            (toll_free.country.as_str(), toll_free.subdivision),
            ("US", None)
        );
        assert_eq!(of("+61291234567").country, "AU");
    }

    #[test]
    fn an_unknown_state_takes_every_states_rules() {
        let fl = of("+13055550123");
        assert!(fl.is_in("US") && fl.is_in("US-FL") && !fl.is_in("US-TX") && !fl.is_in("CA"));
        let unknown = of("+18005550199");
        assert!(unknown.is_in("US-FL") && unknown.is_in("US-TX") && !unknown.is_in("CA-ON"));
    }

    #[test]
    fn the_holiday_table_is_loaded() {
        let christmas: Date = "2026-12-25".parse().unwrap();
        assert!(is_listed_holiday("US-AL", christmas));
        assert!(is_listed_holiday("AU", christmas));
        assert!(!is_listed_holiday("US-AL", "2026-12-23".parse().unwrap()));
        assert_eq!(holiday_years(), "2025-2030");
        assert!(holidays_cover(christmas));
        assert!(!holidays_cover("2031-01-02".parse().unwrap()));
    }

    #[test]
    fn us_territories_are_in_the_us() {
        let pr = of("+17875550123");
        assert_eq!((pr.country.as_str(), pr.subdivision), ("US", Some("US-PR")));
        assert!(pr.is_in("US") && pr.is_in("US-PR") && !pr.is_in("US-FL"));
    }
}
