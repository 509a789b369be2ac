//! Durations ("250ms", "30s") and sizes ("8MiB", "64KiB") as config values. A zero duration is
//! rejected while parsing, so the error points at the offending value.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A strictly positive duration written like "250ms", "30s" or "1m 30s".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Duration(pub std::time::Duration);

impl Duration {
    pub(crate) const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub(crate) const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }
    pub(crate) fn get(self) -> std::time::Duration {
        self.0
    }
}

/// A duration or size that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UnitError {
    #[error("invalid duration {0:?} ({1}); write it like \"250ms\" or \"30s\"")]
    Duration(String, String),
    #[error("duration {0:?} must be greater than zero")]
    ZeroDuration(String),
    #[error("invalid size {0:?} ({1}); write it like \"64KiB\" or \"8MiB\"")]
    Size(String, String),
}

impl std::str::FromStr for Duration {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| UnitError::Duration(s.to_owned(), e.to_string()))?;
        if d.is_zero() {
            return Err(UnitError::ZeroDuration(s.to_owned()));
        }
        Ok(Duration(d))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A byte size written like "8MiB", "64KiB", "1GB" or as a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Size(pub u64);

impl std::str::FromStr for Size {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|e| UnitError::Size(s.to_owned(), e.to_string()))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Str(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&bytesize::ByteSize(self.0).display().iec())
    }
}

/// A size that must not be zero (a head limit of 0 would refuse every request).
pub(crate) fn nonzero_size<'de, D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
    let s = Size::deserialize(d)?;
    if s.0 == 0 {
        return Err(de::Error::custom("this limit must be greater than zero"));
    }
    Ok(s)
}

/// A count that must not be zero.
pub(crate) fn nonzero_count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if n == 0 {
        return Err(de::Error::custom("this limit must be greater than zero"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_limits_of_zero_are_refused_where_they_are_written() {
        let err =
            toml::from_str::<crate::config::ServerConfig>("max_header_count = 0").unwrap_err();
        assert!(err.message().contains("greater than zero"), "{err}");
        assert_eq!(err.span(), Some(19..20));
        for key in ["max_request_head", "max_header_size", "max_uri_length"] {
            let err = toml::from_str::<crate::config::ServerConfig>(&format!("{key} = \"0KiB\""))
                .unwrap_err();
            assert!(err.message().contains("greater than zero"), "{key}: {err}");
        }
        assert!(toml::from_str::<crate::config::ServerConfig>("max_uri_length = \"2KiB\"").is_ok());
    }

    #[test]
    fn durations() {
        assert_eq!("250ms".parse::<Duration>().unwrap().get().as_millis(), 250);
        assert_eq!("30s".parse::<Duration>().unwrap().get().as_secs(), 30);
        assert_eq!(
            "0s".parse::<Duration>().unwrap_err(),
            UnitError::ZeroDuration("0s".into())
        );
        assert!("soon".parse::<Duration>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!("8MiB".parse::<Size>().unwrap().0, 8 * 1024 * 1024);
        assert_eq!("64KiB".parse::<Size>().unwrap().0, 64 * 1024);
        assert_eq!("1000".parse::<Size>().unwrap().0, 1000);
        assert!("lots".parse::<Size>().is_err());
    }
}
