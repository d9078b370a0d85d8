//! Calling hours in the recipient's local time.

use jiff::Timestamp;
use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;

use super::model::{HoursPolicy, UnknownZone};

/// A compiled calling-hours window.
#[derive(Debug, Clone)]
pub struct CallingHours {
    start: Time,
    end: Time,
    days: Vec<Weekday>,
    unknown_zone: UnknownZone,
}

pub(super) fn parse_hhmm(s: &str) -> Result<Time, String> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not HH:MM"))?;
    let (h, m): (i8, i8) = (
        h.parse().map_err(|_| format!("{s:?} is not HH:MM"))?,
        m.parse().map_err(|_| format!("{s:?} is not HH:MM"))?,
    );
    if h == 24 && m == 0 {
        return Ok(Time::MAX);
    }
    Time::new(h, m, 0, 0).map_err(|_| format!("{s:?} is not a time of day"))
}

pub(super) fn parse_day(s: &str) -> Result<Weekday, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Monday,
        "tue" | "tuesday" => Weekday::Tuesday,
        "wed" | "wednesday" => Weekday::Wednesday,
        "thu" | "thursday" => Weekday::Thursday,
        "fri" | "friday" => Weekday::Friday,
        "sat" | "saturday" => Weekday::Saturday,
        "sun" | "sunday" => Weekday::Sunday,
        _ => return Err(format!("{s:?} is not a day (mon..sun)")),
    })
}

impl CallingHours {
    pub fn compile(p: &HoursPolicy) -> Result<Self, String> {
        let start = parse_hhmm(&p.start)?;
        let end = parse_hhmm(&p.end)?;
        if start >= end {
            return Err(format!("start {} must be before end {}", p.start, p.end));
        }
        let days = match &p.days {
            Some(days) => days
                .iter()
                .map(|d| parse_day(d))
                .collect::<Result<_, _>>()?,
            None => vec![
                Weekday::Monday,
                Weekday::Tuesday,
                Weekday::Wednesday,
                Weekday::Thursday,
                Weekday::Friday,
            ],
        };
        Ok(CallingHours {
            start,
            end,
            days,
            unknown_zone: p.unknown_zone,
        })
    }

    /// Whether a call may start at `now` to a number that may ring in any of `zones`. Where the
    /// number's prefix leaves several zones possible, the window must hold in every one of them:
    /// a call that might be unlawful is not placed. On refusal, says why.
    pub fn check(&self, now: Timestamp, zones: &[TimeZone]) -> Result<(), String> {
        if zones.is_empty() {
            return match self.unknown_zone {
                UnknownZone::Allow => Ok(()),
                UnknownZone::Deny => Err("the recipient's time zone is unknown".into()),
            };
        }
        for tz in zones {
            let local = now.to_zoned_datetime(tz.clone());
            let time = local.time();
            let name = tz.iana_name().unwrap_or("local");
            if !self.days.contains(&local.weekday()) {
                return Err(format!(
                    "it is {:?} in {name}, not a calling day",
                    local.weekday()
                ));
            }
            if time < self.start || time >= self.end {
                return Err(format!(
                    "it is {} in {name}, outside calling hours {}-{}",
                    local.strftime("%H:%M"),
                    self.start.strftime("%H:%M"),
                    self.end.strftime("%H:%M")
                ));
            }
        }
        Ok(())
    }

    /// The local time the window opens.
    pub fn start(&self) -> Time {
        self.start
    }

    /// The first instant at or after `now` when a call may start, within the next 8 days; `None`
    /// if there is none (the zones' windows never overlap, or the zone is unknown).
    pub fn next_allowed(&self, now: Timestamp, zones: &[TimeZone]) -> Option<Timestamp> {
        if self.check(now, zones).is_ok() {
            return Some(now);
        }
        // A call becomes possible when a window opens in one of the zones: try each opening
        // (each zone's start on each of the next days), earliest first.
        let mut openings: Vec<Timestamp> = Vec::new();
        for tz in zones {
            let today = now.to_zoned_datetime(tz.clone()).date();
            for days in 0..9 {
                let Ok(date) = today.checked_add(jiff::Span::new().days(days)) else {
                    continue;
                };
                if let Ok(open) = date.to_datetime(self.start).to_zoned_datetime(tz.clone())
                    && open.timestamp() > now
                {
                    openings.push(open.timestamp());
                }
            }
        }
        openings.sort();
        openings.into_iter().find(|t| self.check(*t, zones).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hours(start: &str, end: &str) -> CallingHours {
        CallingHours::compile(&HoursPolicy {
            start: start.into(),
            end: end.into(),
            days: None,
            unknown_zone: UnknownZone::Deny,
        })
        .unwrap()
    }

    fn tz(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    #[test]
    fn window_is_in_the_recipients_zone() {
        let h = hours("09:00", "20:00");
        // Monday 2026-01-05 17:30 UTC = 09:30 in Los Angeles, 12:30 in New York.
        let now: Timestamp = "2026-01-05T17:30:00Z".parse().unwrap();
        assert!(h.check(now, &[tz("America/Los_Angeles")]).is_ok());
        // 16:30 UTC = 08:30 in Los Angeles: too early there, fine in New York.
        let early: Timestamp = "2026-01-05T16:30:00Z".parse().unwrap();
        let err = h.check(early, &[tz("America/Los_Angeles")]).unwrap_err();
        assert!(err.contains("08:30"), "{err}");
        assert!(h.check(early, &[tz("America/New_York")]).is_ok());
    }

    #[test]
    fn every_possible_zone_must_be_in_the_window() {
        let h = hours("09:00", "20:00");
        let early: Timestamp = "2026-01-05T16:30:00Z".parse().unwrap();
        let zones = [tz("America/New_York"), tz("America/Los_Angeles")];
        assert!(h.check(early, &zones).is_err());
    }

    #[test]
    fn the_next_allowed_time_opens_in_every_zone() {
        let h = hours("09:00", "20:00");
        // Friday 2026-01-09 23:00 UTC: 18:00 in New York, 15:00 in Los Angeles: allowed now.
        let friday: Timestamp = "2026-01-09T23:00:00Z".parse().unwrap();
        let both = [tz("America/New_York"), tz("America/Los_Angeles")];
        assert_eq!(h.next_allowed(friday, &both), Some(friday));
        // Saturday: next is Monday 09:00 in Los Angeles (17:00 UTC), when New York is open too.
        let saturday: Timestamp = "2026-01-10T18:00:00Z".parse().unwrap();
        let next = h.next_allowed(saturday, &both).unwrap();
        assert_eq!(next.to_string(), "2026-01-12T17:00:00Z");
        assert_eq!(
            h.next_allowed(saturday, &[tz("America/New_York")])
                .unwrap()
                .to_string(),
            "2026-01-12T14:00:00Z"
        );
        assert_eq!(h.next_allowed(saturday, &[]), None);
    }

    #[test]
    fn weekends_and_unknown_zones() {
        let h = hours("09:00", "20:00");
        let saturday: Timestamp = "2026-01-10T18:00:00Z".parse().unwrap();
        assert!(h.check(saturday, &[tz("America/New_York")]).is_err());
        assert!(h.check(saturday, &[]).is_err());
    }

    #[test]
    fn end_is_exclusive_and_bad_windows_are_refused() {
        let h = hours("09:00", "20:00");
        let at_end: Timestamp = "2026-01-06T01:00:00Z".parse().unwrap(); // 20:00 Mon in New York
        assert!(h.check(at_end, &[tz("America/New_York")]).is_err());
        assert!(
            CallingHours::compile(&HoursPolicy {
                start: "20:00".into(),
                end: "09:00".into(),
                days: None,
                unknown_zone: UnknownZone::Deny
            })
            .is_err()
        );
    }
}
