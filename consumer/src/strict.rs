//! Reading a body into a handler's type, strictly: a struct must come as a
//! JSON object. serde accepts a struct written as an array of its fields
//! (`[5]` for `{"n": 5}`), which no producer of ours writes: such a body is
//! a different message that happens to fit, and it is refused (and
//! dead-lettered) rather than applied.

use serde::de::{DeserializeOwned, Deserializer, Visitor};

/// `E` from a JSON body; a struct at the top level must be an object.
pub(crate) fn from_slice<E: DeserializeOwned>(body: &[u8]) -> serde_json::Result<E> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = E::deserialize(ObjectsOnly(&mut de))?;
    de.end()?;
    Ok(value)
}

/// A deserializer that reads a struct only from a map.
struct ObjectsOnly<D>(D);

/// Forwards each `deserialize_*` method to the inner deserializer.
macro_rules! forward {
    ($($method:ident),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
                self.0.$method(visitor)
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectsOnly<D> {
    type Error = D::Error;

    forward!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        // A map only: the array form of a struct is refused.
        self.0.deserialize_map(visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_unit_struct(name, visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_newtype_struct(name, visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple(len, visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple_struct(name, len, visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_enum(name, variants, visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Ev {
        n: i64,
    }

    #[test]
    fn a_struct_must_be_an_object() {
        assert_eq!(from_slice::<Ev>(br#"{"n": 5}"#).unwrap(), Ev { n: 5 });
        let e = from_slice::<Ev>(b"[5]").unwrap_err().to_string();
        assert!(e.contains("expected struct Ev"), "{e}");
        assert!(from_slice::<Ev>(br#"{"n": 5} trailing"#).is_err());
    }

    #[test]
    fn other_types_read_as_serde_json_reads_them() {
        assert_eq!(from_slice::<Vec<i64>>(b"[1, 2]").unwrap(), [1, 2]);
        assert_eq!(
            from_slice::<serde_json::Value>(b"[5]").unwrap(),
            serde_json::json!([5])
        );
        assert_eq!(from_slice::<Option<Ev>>(b"null").unwrap(), None);
    }
}
