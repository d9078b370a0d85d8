//! Stage 4: parse the body as strict JSON and validate it against
//! `policies/schemas/create_call.json` (JSON Schema 2020-12).
//!
//! Strict means: valid UTF-8, no duplicate keys (which parsers resolve differently, a classic
//! smuggling route), nesting no deeper than `server.max_json_depth`. A schema violation names the
//! failing field by its JSON pointer.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::{CallRequest, CreateCall, Stage};
use crate::error::GatewayError;

/// Reads a JSON value whose objects have no duplicate keys and whose objects and arrays nest no
/// deeper than `max`; `depth` is the nesting of the value read (0 for the body itself). The
/// depth is checked as the value is read, not in a pass of its own over the bytes.
#[derive(Clone, Copy)]
struct Strict<'a> {
    depth: usize,
    max: usize,
    /// Set when the value was refused for its nesting (the error then says so plainly).
    too_deep: &'a Cell<bool>,
}

impl Strict<'_> {
    /// The reader for the values of an object or array this one opens.
    fn inner<E: de::Error>(self) -> Result<Self, E> {
        if self.depth >= self.max {
            self.too_deep.set(true);
            return Err(E::custom("nested too deep"));
        }
        Ok(Strict {
            depth: self.depth + 1,
            ..self
        })
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.inner()?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(inner)? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.inner()?;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            // The object itself tells a key seen before: no second set of keys, no copies.
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            let v = map.next_value_seed(inner)?;
            object.insert(key, v);
        }
        Ok(Value::Object(object))
    }
}

/// Parse a body into a JSON value, strictly.
pub fn parse_strict(bytes: &[u8], max_depth: usize) -> Result<Value, GatewayError> {
    let invalid = |message: String| GatewayError::InvalidRequest {
        message,
        param: None,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(invalid("body is empty; expected a JSON object".into()));
    }
    let too_deep = Cell::new(false);
    let strict = Strict {
        depth: 0,
        max: max_depth,
        too_deep: &too_deep,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let value = strict
        .deserialize(&mut de)
        .map_err(|e| match too_deep.get() {
            true => invalid(format!("JSON is nested deeper than {max_depth} levels")),
            false => invalid(format!("body is not valid JSON: {e}")),
        })?;
    de.end()
        .map_err(|e| invalid(format!("body is not valid JSON: {e}")))?;
    Ok(value)
}

/// Validate `value` against the schema; the first violation becomes the error.
pub fn check_schema(schema: &jsonschema::Validator, value: &Value) -> Result<(), GatewayError> {
    // The boolean check first: it stops at the first failure and builds no error, which a valid
    // request (nearly all of them) never needs.
    if schema.is_valid(value) {
        return Ok(());
    }
    let Some(error) = schema.iter_errors(value).next() else {
        return Ok(());
    };
    let base = error.instance_path().as_str().to_string();
    let (param, message) = match error.kind() {
        jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
            let field = unexpected.first().cloned().unwrap_or_default();
            (
                format!("{base}/{field}"),
                format!("unknown field {field:?}"),
            )
        }
        jsonschema::error::ValidationErrorKind::Required { property } => {
            let field = property.as_str().unwrap_or_default().to_string();
            (
                format!("{base}/{field}"),
                format!("missing required field {field:?}"),
            )
        }
        _ => {
            let field = if base.is_empty() {
                "body".to_string()
            } else {
                base.clone()
            };
            (base.clone(), format!("{field}: {}", error.masked()))
        }
    };
    // An unusable number (empty, wrong type, bad syntax) is the same mistake however the schema
    // or the numbering plan finds it: one code for it, as the upstream has.
    let missing = matches!(
        error.kind(),
        jsonschema::error::ValidationErrorKind::Required { .. }
    );
    Err(match param.as_str() {
        "/phone_number" if !missing => GatewayError::InvalidPhoneNumber { message, param },
        "/from_number" if !missing => GatewayError::InvalidFromNumber(message),
        _ => GatewayError::invalid(param, message),
    })
}

/// See the module docs.
#[derive(Debug)]
pub struct Validate {
    pub max_depth: usize,
}

impl Stage for Validate {
    const NAME: &'static str = "validate";

    fn apply(&self, req: &mut CallRequest) -> Result<(), GatewayError> {
        let value = parse_strict(&req.body, self.max_depth)?;
        check_schema(&req.policies.schema, &value)?;
        let call: CreateCall =
            serde_json::from_value(value).map_err(|e| GatewayError::InvalidRequest {
                message: format!("body does not match the call request: {e}"),
                param: None,
            })?;
        req.call = Some(call);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::fixture_policies;

    fn check(body: &str) -> Result<(), GatewayError> {
        let p = fixture_policies();
        let v = parse_strict(body.as_bytes(), 16)?;
        check_schema(&p.schema, &v)
    }

    fn param(body: &str) -> String {
        check(body).unwrap_err().param().unwrap_or("").to_string()
    }

    #[test]
    fn the_seed_request_is_valid() {
        check(
            r#"{"phone_number": "+14155551234", "agent_id": "agent_abc123",
                  "metadata": {"customer_id": "cust_456"}, "record": true, "max_duration": 600}"#,
        )
        .unwrap();
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let err = check(
            r#"{"phone_number": "+14155551234", "phone_number": "+19005550123", "agent_id": "a"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("duplicate key"), "{err}");
        let nested =
            check(r#"{"phone_number": "+1", "agent_id": "a", "metadata": {"k": 1, "k": 2}}"#);
        assert!(nested.unwrap_err().to_string().contains("duplicate"));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert!(
            parse_strict(b"\xff\xfe{}", 16)
                .unwrap_err()
                .to_string()
                .contains("UTF-8")
        );
        assert!(
            parse_strict(b"{\"a\":", 16)
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
        assert!(parse_strict(b"{} {}", 16).is_err());
        assert!(parse_strict(b"   ", 16).is_err());
        let deep = "[".repeat(17) + &"]".repeat(17);
        assert!(
            parse_strict(deep.as_bytes(), 16)
                .unwrap_err()
                .to_string()
                .contains("nested deeper than 16 levels")
        );
        // Sixteen levels are allowed, in objects as in arrays; the seventeenth is not.
        let sixteen = "[".repeat(16) + &"]".repeat(16);
        assert!(parse_strict(sixteen.as_bytes(), 16).is_ok());
        let objects = |n: usize| "{\"a\":".repeat(n) + "1" + &"}".repeat(n);
        assert!(parse_strict(objects(16).as_bytes(), 16).is_ok());
        assert!(
            parse_strict(objects(17).as_bytes(), 16)
                .unwrap_err()
                .to_string()
                .contains("nested deeper")
        );
        // Too deep even where the rest of the body would not parse.
        let broken = "[".repeat(17) + "oops";
        assert!(
            parse_strict(broken.as_bytes(), 16)
                .unwrap_err()
                .to_string()
                .contains("nested deeper")
        );
        // Brackets inside strings do not count.
        let s = format!("{{\"a\": \"{}\"}}", "[".repeat(40));
        assert!(parse_strict(s.as_bytes(), 16).is_ok());
    }

    #[test]
    fn schema_errors_name_the_field() {
        assert_eq!(param(r#"{"agent_id": "a"}"#), "/phone_number");
        assert_eq!(
            param(r#"{"phone_number": "+14155551234", "agent_id": "a", "colour": 1}"#),
            "/colour"
        );
        assert_eq!(
            param(r#"{"phone_number": 14155551234, "agent_id": "a"}"#),
            "/phone_number"
        );
        assert_eq!(
            param(r#"{"phone_number": "+14155551234", "agent_id": "a", "max_duration": 0}"#),
            "/max_duration"
        );
        assert_eq!(
            param(r#"{"phone_number": "+14155551234", "agent_id": "a", "max_duration": 3601}"#),
            "/max_duration"
        );
        assert_eq!(
            param(r#"{"phone_number": "+14155551234", "agent_id": "a", "max_duration": 1.5}"#),
            "/max_duration"
        );
        assert_eq!(
            param(r#"{"phone_number": "+14155551234", "agent_id": "a", "record": "yes"}"#),
            "/record"
        );
        assert_eq!(
            param(r#"{"phone_number": "+14155551234", "agent_id": "a", "metadata": []}"#),
            "/metadata"
        );
        assert_eq!(
            param(
                r#"{"phone_number": "+14155551234", "agent_id": "a", "metadata": {"k": {"x": 1}}}"#
            ),
            "/metadata/k"
        );
        assert!(check("[1, 2]").is_err());
    }
}
