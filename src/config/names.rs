//! `key = "NAME"`, `key = ["A", "B"]` or `key = "none"`: how a frontend or route names the
//! shared definitions it uses (`auth`, `rate_limit`). One type, with the words of each use.

use std::marker::PhantomData;

use serde::{Deserialize, Serialize, Serializer};

/// The words of one use of `Names`.
pub(crate) trait Kind {
    /// What the key takes, for the error of a value of another type.
    const EXPECTING: &'static str;
    /// The error of an empty list.
    const EMPTY: &'static str;
}

/// One name, a list of names, or `"none"`.
pub(crate) struct Names<K> {
    list: Vec<String>,
    one: bool,
    _kind: PhantomData<fn() -> K>,
}

impl<K> Names<K> {
    /// The names; empty for `"none"`.
    pub(crate) fn names(&self) -> Vec<&str> {
        if self.one && self.list.first().is_some_and(|n| n == "none") {
            return Vec::new();
        }
        self.list.iter().map(String::as_str).collect()
    }
}

impl<K> Clone for Names<K> {
    fn clone(&self) -> Self {
        Names {
            list: self.list.clone(),
            one: self.one,
            _kind: PhantomData,
        }
    }
}

impl<K> PartialEq for Names<K> {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list && self.one == other.one
    }
}

impl<K> std::fmt::Debug for Names<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.one {
            self.list.first().fmt(f)
        } else {
            self.list.fmt(f)
        }
    }
}

impl<K> Serialize for Names<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (self.one, self.list.first()) {
            (true, Some(n)) => s.serialize_str(n),
            _ => self.list.serialize(s),
        }
    }
}

/// By hand rather than `untagged`, whose error ("data did not match any variant") says
/// nothing of what the key takes.
impl<'de, K: Kind> Deserialize<'de> for Names<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<K>(PhantomData<K>);
        impl<'de, K: Kind> serde::de::Visitor<'de> for V<K> {
            type Value = Names<K>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(K::EXPECTING)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Names<K>, E> {
                Ok(Names {
                    list: vec![v.to_owned()],
                    one: true,
                    _kind: PhantomData,
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Names<K>, A::Error> {
                let mut list = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    list.push(n);
                }
                if list.is_empty() {
                    return Err(serde::de::Error::custom(K::EMPTY));
                }
                Ok(Names {
                    list,
                    one: false,
                    _kind: PhantomData,
                })
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// `auth`: any one provider suffices.
pub(crate) struct AuthNames;
impl Kind for AuthNames {
    const EXPECTING: &'static str = "a provider name, a list of provider names, or \"none\"";
    const EMPTY: &'static str =
        "`auth = []` names no provider; write `auth = \"none\"` to open a route";
}

/// `rate_limit`: every policy must admit.
pub(crate) struct RateLimitNames;
impl Kind for RateLimitNames {
    const EXPECTING: &'static str = "a rate limit name, a list of them, or \"none\"";
    const EMPTY: &'static str =
        "`rate_limit = []` names no policy; write `rate_limit = \"none\"` to lift a limit";
}
