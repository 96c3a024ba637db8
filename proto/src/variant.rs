//! The name of an enum value's variant (`AuthorizeDial` for a `Request::AuthorizeDial{..}`),
//! for metrics labels. Taken from the type's own `Serialize`, which names the variant before
//! it writes anything else, so a variant added later is named without a table to update,
//! and nothing of the value is formatted or copied.

use serde::ser::{self, Impossible, Serialize, Serializer};

/// The variant's name, or `"-"` for a value that is not an enum.
pub fn variant_name<T: Serialize + ?Sized>(value: &T) -> &'static str {
    match value.serialize(NameOnly) {
        Err(Stop::Found(name)) => name,
        _ => "-",
    }
}

#[derive(Debug)]
enum Stop {
    Found(&'static str),
    NotAnEnum,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("variant name only")
    }
}

impl std::error::Error for Stop {}

impl ser::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop::NotAnEnum
    }
}

struct NameOnly;

type Never = Impossible<(), Stop>;

macro_rules! not_an_enum {
    ($($f:ident($($t:ty),*);)*) => {
        $(fn $f(self, $(_: $t),*) -> Result<(), Stop> { Err(Stop::NotAnEnum) })*
    };
}

impl Serializer for NameOnly {
    type Ok = ();
    type Error = Stop;
    type SerializeSeq = Never;
    type SerializeTuple = Never;
    type SerializeTupleStruct = Never;
    type SerializeTupleVariant = Never;
    type SerializeMap = Never;
    type SerializeStruct = Never;
    type SerializeStructVariant = Never;

    not_an_enum! {
        serialize_bool(bool);
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
        serialize_f32(f32);
        serialize_f64(f64);
        serialize_char(char);
        serialize_str(&str);
        serialize_bytes(&[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(&'static str);
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), Stop> {
        Err(Stop::NotAnEnum)
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, v: &'static str) -> Result<(), Stop> {
        Err(Stop::Found(v))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Stop> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        v: &'static str,
        _: &T,
    ) -> Result<(), Stop> {
        Err(Stop::Found(v))
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Never, Stop> {
        Err(Stop::NotAnEnum)
    }

    fn serialize_tuple(self, _: usize) -> Result<Never, Stop> {
        Err(Stop::NotAnEnum)
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Never, Stop> {
        Err(Stop::NotAnEnum)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        v: &'static str,
        _: usize,
    ) -> Result<Never, Stop> {
        Err(Stop::Found(v))
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Never, Stop> {
        Err(Stop::NotAnEnum)
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Never, Stop> {
        Err(Stop::NotAnEnum)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        v: &'static str,
        _: usize,
    ) -> Result<Never, Stop> {
        Err(Stop::Found(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::Request;

    #[test]
    fn names_every_kind_of_variant() {
        assert_eq!(variant_name(&Request::Ping), "Ping");
        assert_eq!(
            variant_name(&Request::UserRemove { name: "a".into() }),
            "UserRemove"
        );
        assert_eq!(
            variant_name(&Request::AuditRecord(Vec::new())),
            "AuditRecord"
        );
        assert_eq!(variant_name(&3u8), "-");
        assert_eq!(variant_name("text"), "-");
    }
}
