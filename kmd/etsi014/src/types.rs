//! The data formats of ETSI GS QKD 014 V1.1.1, clause 6, as serde types.
//!
//! Field names on the wire are exactly the specification's (`source_KME_ID`, `key_IDs`, …); the
//! Rust fields are their snake-case spellings. Optional members are left out when serializing
//! and accepted as absent *or* `null` when parsing, and unknown members are ignored, so that
//! third-party KMEs and SAEs that add vendor fields still interoperate.
//!
//! Key material is held as [`KeyMaterial`]: zeroized on drop, base64 (RFC 4648) on the wire, and
//! never printed by `Debug`.

use std::fmt;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// The path prefix of every ETSI GS QKD 014 V1.1.1 method: `/api/v1/keys`.
pub const API_PREFIX: &str = "/api/v1/keys";

/// An extension object (`status_extension`, `key_ID_extension`, an `extension_mandatory`
/// entry, …): a JSON object whose members the specification leaves to vendors.
pub type Extension = serde_json::Map<String, serde_json::Value>;

/// Error messages the specification gives as examples (clause 5); KMEs use them verbatim so
/// that SAEs can match on them.
pub mod messages {
    /// 400 from *Get key with key IDs*: an ID is unknown, already delivered, or not the caller's.
    pub const KEYS_NOT_FOUND: &str = "one or more keys specified are not found on KME";
    /// 400 from *Get key*: `size` is not a multiple of 8.
    pub const SIZE_NOT_MULTIPLE_OF_8: &str = "size shall be a multiple of 8";
    /// 400 from *Get key*: `number` or `size` outside what the KME allows (see its status).
    pub const PARAMETERS_NOT_ADHERING: &str = "requested parameters do not adhere to KME rules";
    /// 400 from *Get key*: an `extension_mandatory` member the KME does not know.
    pub const EXTENSION_MANDATORY_UNSUPPORTED: &str = "not all extension_mandatory parameters are supported";
    /// 400 from *Get key*: an `extension_mandatory` member the KME knows but cannot satisfy.
    pub const EXTENSION_MANDATORY_UNMET: &str = "not all extension_mandatory request options could be met";
    /// 401: the caller is not authorized for this request.
    pub const UNAUTHORIZED: &str = "unauthorized";
}

/// Base64 as in RFC 4648 with the standard alphabet; padding is written, and accepted whether
/// present or not (some KMEs omit it).
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// `null` reads as the type's default (an empty list), as some implementations send it.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Status data format (clause 6.1): what `GET …/{slave_SAE_ID}/status` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// KME ID of the KME answering (`source_KME_ID`).
    #[serde(rename = "source_KME_ID")]
    pub source_kme_id: String,
    /// KME ID of the KME the slave SAE is attached to (`target_KME_ID`).
    #[serde(rename = "target_KME_ID")]
    pub target_kme_id: String,
    /// SAE ID of the calling master SAE (`master_SAE_ID`).
    #[serde(rename = "master_SAE_ID")]
    pub master_sae_id: String,
    /// SAE ID of the slave SAE named in the path (`slave_SAE_ID`).
    #[serde(rename = "slave_SAE_ID")]
    pub slave_sae_id: String,
    /// Default key size in bits.
    pub key_size: u32,
    /// Number of keys of the default size available to the pair now.
    pub stored_key_count: u64,
    /// Maximum number of keys the KME stores for the pair.
    pub max_key_count: u64,
    /// Maximum `number` in one *Get key* request.
    pub max_key_per_request: u32,
    /// Largest key size in bits the KME can deliver.
    pub max_key_size: u32,
    /// Smallest key size in bits the KME can deliver.
    pub min_key_size: u32,
    /// Maximum number of `additional_slave_SAE_IDs` (0: no multicast).
    #[serde(rename = "max_SAE_ID_count")]
    pub max_sae_id_count: u32,
    /// Vendor extension (`status_extension`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_extension: Option<Extension>,
}

/// Key request data format (clause 6.2): the body of `POST …/{slave_SAE_ID}/enc_keys`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyRequest {
    /// Number of keys; the KME's default is 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u32>,
    /// Size of each key in bits; the KME's default is its status `key_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// Further slave SAEs that shall receive the same keys (`additional_slave_SAE_IDs`).
    #[serde(
        rename = "additional_slave_SAE_IDs",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub additional_slave_sae_ids: Vec<String>,
    /// Extensions the KME must honour or refuse the request.
    #[serde(default, deserialize_with = "null_as_default", skip_serializing_if = "Vec::is_empty")]
    pub extension_mandatory: Vec<Extension>,
    /// Extensions the KME may ignore.
    #[serde(default, deserialize_with = "null_as_default", skip_serializing_if = "Vec::is_empty")]
    pub extension_optional: Vec<Extension>,
}

impl KeyRequest {
    /// A request for `number` keys of `size` bits (`None`: the KME's default size).
    pub fn new(number: u32, size: Option<u32>) -> Self {
        Self { number: Some(number), size, ..Self::default() }
    }
}

/// Key container data format (clause 6.3): what *Get key* and *Get key with key IDs* return.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyContainer {
    /// The keys.
    #[serde(deserialize_with = "null_as_default")]
    pub keys: Vec<Key>,
    /// Vendor extension (`key_container_extension`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_container_extension: Option<Extension>,
}

/// One key of a [`KeyContainer`]. `Debug` shows the ID and the key's length only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    /// The key's ID, a UUID (`key_ID`).
    #[serde(rename = "key_ID")]
    pub key_id: String,
    /// Vendor extension (`key_ID_extension`).
    #[serde(rename = "key_ID_extension", default, skip_serializing_if = "Option::is_none")]
    pub key_id_extension: Option<Extension>,
    /// The key, base64 on the wire.
    pub key: KeyMaterial,
    /// Vendor extension (`key_extension`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_extension: Option<Extension>,
}

impl Key {
    /// A key with no extensions.
    pub fn new(key_id: impl Into<String>, key: KeyMaterial) -> Self {
        Self { key_id: key_id.into(), key_id_extension: None, key, key_extension: None }
    }
}

/// Key IDs data format (clause 6.4): the body of `POST …/{master_SAE_ID}/dec_keys`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyIds {
    /// The IDs asked for (`key_IDs`).
    #[serde(rename = "key_IDs", deserialize_with = "null_as_default")]
    pub key_ids: Vec<KeyIdEntry>,
    /// Vendor extension (`key_IDs_extension`).
    #[serde(rename = "key_IDs_extension", default, skip_serializing_if = "Option::is_none")]
    pub key_ids_extension: Option<Extension>,
}

impl KeyIds {
    /// A request for these IDs, without extensions.
    pub fn new<I, S>(ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self { key_ids: ids.into_iter().map(KeyIdEntry::new).collect(), key_ids_extension: None }
    }
}

/// One entry of [`KeyIds`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyIdEntry {
    /// The key's ID (`key_ID`).
    #[serde(rename = "key_ID")]
    pub key_id: String,
    /// Vendor extension (`key_ID_extension`).
    #[serde(rename = "key_ID_extension", default, skip_serializing_if = "Option::is_none")]
    pub key_id_extension: Option<Extension>,
}

impl KeyIdEntry {
    /// An entry without extension.
    pub fn new(key_id: impl Into<String>) -> Self {
        Self { key_id: key_id.into(), key_id_extension: None }
    }
}

/// Error data format (clause 6.5): the body of a 400, 401 or 503 answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, in the words of clause 5 where it has an example.
    pub message: String,
    /// Further detail objects.
    #[serde(default, deserialize_with = "null_as_default", skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<Extension>,
}

impl ErrorBody {
    /// An error with a message and no details.
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), details: Vec::new() }
    }

    /// Adds one detail object `{name: value}`.
    pub fn with_detail(mut self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        let mut obj = Extension::new();
        obj.insert(name.into(), value.into());
        self.details.push(obj);
        self
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if !self.details.is_empty() {
            // Details are the KME's words about the request, never key material.
            write!(
                f,
                " {}",
                serde_json::Value::Array(self.details.iter().cloned().map(Into::into).collect())
            )?;
        }
        Ok(())
    }
}

/// Secret key bytes: zeroized when dropped, base64 in JSON, redacted in `Debug`.
///
/// Equality is constant-time in the contents (it still reveals the length).
#[derive(Clone, Default)]
pub struct KeyMaterial(Zeroizing<Vec<u8>>);

impl KeyMaterial {
    /// Takes ownership of the bytes.
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the key is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Length in bits (the unit of the specification's `size`).
    pub fn bits(&self) -> u64 {
        self.0.len() as u64 * 8
    }

    /// The bytes, still zeroized on drop.
    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }

    /// Decodes base64 (padding optional) without leaving an unzeroized copy behind.
    pub fn from_base64(text: &str) -> Result<Self, base64::DecodeError> {
        let mut out = Zeroizing::new(Vec::with_capacity(text.len() / 4 * 3 + 3));
        B64.decode_vec(text, &mut out)?;
        Ok(Self(out))
    }

    /// Encodes as base64 with padding.
    pub fn to_base64(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(self.0.len().div_ceil(3) * 4));
        B64.encode_string(&*self.0, &mut out);
        out
    }
}

impl From<Zeroizing<Vec<u8>>> for KeyMaterial {
    fn from(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }
}

impl From<Vec<u8>> for KeyMaterial {
    fn from(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }
}

impl PartialEq for KeyMaterial {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl Eq for KeyMaterial {}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key bytes never reach a log.
        write!(f, "KeyMaterial(<{} bytes>)", self.0.len())
    }
}

impl Serialize for KeyMaterial {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for KeyMaterial {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = KeyMaterial;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a base64 string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<KeyMaterial, E> {
                // base64's own error would quote the offending character: keep key text out.
                KeyMaterial::from_base64(v).map_err(|_| E::custom("key is not valid base64"))
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compacts a JSON text written with insignificant whitespace, keeping member order.
    fn compact(text: &str) -> String {
        let mut out = String::new();
        let mut in_string = false;
        let mut escaped = false;
        for c in text.chars() {
            if in_string {
                out.push(c);
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
            } else if c == '"' {
                in_string = true;
                out.push(c);
            } else if !c.is_whitespace() {
                out.push(c);
            }
        }
        out
    }

    /// Parses a specification example into our type and writes it back: the result must be
    /// the example itself, member names and order included.
    fn round_trip<T: Serialize + for<'de> Deserialize<'de>>(example: &str) -> T {
        let value: T = serde_json::from_str(example).expect("example parses");
        assert_eq!(serde_json::to_string(&value).expect("serializes"), compact(example));
        value
    }

    // Clause 6.1, Status data format example.
    const STATUS: &str = r#"{
        "source_KME_ID": "AAAABBBBCCCCDDDD",
        "target_KME_ID": "EEEEFFFFGGGGHHHH",
        "master_SAE_ID": "IIIIJJJJKKKKLLLL",
        "slave_SAE_ID": "MMMMNNNNOOOOPPPP",
        "key_size": 352,
        "stored_key_count": 25000,
        "max_key_count": 100000,
        "max_key_per_request": 128,
        "max_key_size": 1024,
        "min_key_size": 64,
        "max_SAE_ID_count": 0
    }"#;

    // Clause 6.2, Key request data format example.
    const KEY_REQUEST: &str = r#"{
        "number": 3,
        "size": 1024,
        "additional_slave_SAE_IDs": ["ABCDEFG", "HIJKLMN"],
        "extension_mandatory": [
            {"abc_route_type": "direct"},
            {"abc_transfer_method": "qkd"}
        ],
        "extension_optional": [
            {"abc_max_age": 30000}
        ]
    }"#;

    // Clause 6.3, Key container data format example.
    const KEY_CONTAINER: &str = r#"{
        "keys": [
            {
                "key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139",
                "key": "wHHVxRwDJs3/bXd38GHP3oe4svTuRpZS0yCC7x4Ly+s="
            },
            {
                "key_ID": "0a782fb5-3434-48fe-aa4d-14f41d46cf92",
                "key": "OeGMPxh1+2RpJpNCYixWHFLYRubpOKCw94FcCI7VdJA="
            }
        ]
    }"#;

    // Clause 6.4, Key IDs data format example.
    const KEY_IDS: &str = r#"{
        "key_IDs": [
            {"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139"},
            {"key_ID": "0a782fb5-3434-48fe-aa4d-14f41d46cf92"}
        ]
    }"#;

    // Clause 6.5, Error data format, with a detail as in clause 5.2.
    const ERROR: &str = r#"{
        "message": "not all extension_mandatory parameters are supported",
        "details": [
            {"extension_mandatory_unsupported": ["abc_route_type"]}
        ]
    }"#;

    #[test]
    fn status_matches_spec_example() {
        let s: Status = round_trip(STATUS);
        assert_eq!(s.source_kme_id, "AAAABBBBCCCCDDDD");
        assert_eq!(s.slave_sae_id, "MMMMNNNNOOOOPPPP");
        assert_eq!(s.key_size, 352);
        assert_eq!(s.stored_key_count, 25000);
        assert_eq!(s.max_sae_id_count, 0);
        assert!(s.status_extension.is_none());
    }

    #[test]
    fn status_extension_round_trips() {
        let text = compact(STATUS).replace('}', r#","status_extension":{"vendor_link":"up"}}"#);
        let s: Status = serde_json::from_str(&text).expect("parses");
        assert_eq!(s.status_extension.as_ref().and_then(|e| e.get("vendor_link")), Some(&"up".into()));
        assert_eq!(serde_json::to_string(&s).expect("serializes"), text);
    }

    #[test]
    fn key_request_matches_spec_example() {
        let r: KeyRequest = round_trip(KEY_REQUEST);
        assert_eq!(r.number, Some(3));
        assert_eq!(r.size, Some(1024));
        assert_eq!(r.additional_slave_sae_ids, ["ABCDEFG", "HIJKLMN"]);
        assert_eq!(r.extension_mandatory.len(), 2);
        assert_eq!(r.extension_optional[0].get("abc_max_age"), Some(&30000.into()));
    }

    #[test]
    fn key_request_optional_members() {
        let empty: KeyRequest = serde_json::from_str("{}").expect("parses");
        assert_eq!(empty, KeyRequest::default());
        assert_eq!(serde_json::to_string(&empty).expect("serializes"), "{}");
        let nulls: KeyRequest = serde_json::from_str(
            r#"{"number":null,"additional_slave_SAE_IDs":null,"extension_mandatory":null,"extension_optional":null}"#,
        )
        .expect("parses");
        assert_eq!(nulls, KeyRequest::default());
        assert_eq!(
            serde_json::to_string(&KeyRequest::new(2, Some(256))).expect("ser"),
            r#"{"number":2,"size":256}"#
        );
        assert!(serde_json::from_str::<KeyRequest>(r#"{"number":-1}"#).is_err());
    }

    #[test]
    fn key_container_matches_spec_example() {
        let c: KeyContainer = round_trip(KEY_CONTAINER);
        assert_eq!(c.keys.len(), 2);
        assert_eq!(c.keys[0].key_id, "bc490419-7d60-487f-adc1-4ddcc177c139");
        assert_eq!(c.keys[0].key.len(), 32);
        assert_eq!(c.keys[0].key.bits(), 256);
    }

    #[test]
    fn key_container_extensions_round_trip() {
        let text = r#"{"keys":[{"key_ID":"x","key_ID_extension":{"a":1},"key":"AAEC","key_extension":{"b":2}}],"key_container_extension":{"c":3}}"#;
        let c: KeyContainer = serde_json::from_str(text).expect("parses");
        assert_eq!(c.keys[0].key.as_bytes(), [0, 1, 2]);
        assert_eq!(serde_json::to_string(&c).expect("serializes"), text);
    }

    #[test]
    fn key_ids_matches_spec_example() {
        let k: KeyIds = round_trip(KEY_IDS);
        assert_eq!(k.key_ids.len(), 2);
        assert_eq!(
            k,
            KeyIds::new(["bc490419-7d60-487f-adc1-4ddcc177c139", "0a782fb5-3434-48fe-aa4d-14f41d46cf92"])
        );
        let with_null: KeyIds =
            serde_json::from_str(r#"{"key_IDs":[{"key_ID":"a"}],"key_IDs_extension":null}"#).expect("parses");
        assert_eq!(with_null, KeyIds::new(["a"]));
    }

    #[test]
    fn error_matches_spec_example() {
        let e: ErrorBody = round_trip(ERROR);
        assert_eq!(e.message, messages::EXTENSION_MANDATORY_UNSUPPORTED);
        let built = ErrorBody::new(messages::EXTENSION_MANDATORY_UNSUPPORTED)
            .with_detail("extension_mandatory_unsupported", serde_json::json!(["abc_route_type"]));
        assert_eq!(built, e);
        assert_eq!(
            serde_json::to_string(&ErrorBody::new(messages::KEYS_NOT_FOUND)).expect("ser"),
            r#"{"message":"one or more keys specified are not found on KME"}"#
        );
    }

    #[test]
    fn key_material_is_never_printed() {
        let c: KeyContainer = serde_json::from_str(KEY_CONTAINER).expect("parses");
        let debug = format!("{c:?}");
        assert!(!debug.contains("wHHV"), "{debug}");
        assert!(debug.contains("<32 bytes>"), "{debug}");
        assert!(!debug.contains(&format!("{:?}", &c.keys[0].key.as_bytes()[..4])));
    }

    #[test]
    fn base64_padding_is_optional_and_garbage_rejected() {
        assert_eq!(KeyMaterial::from_base64("AAE=").expect("padded").as_bytes(), [0, 1]);
        assert_eq!(KeyMaterial::from_base64("AAE").expect("unpadded").as_bytes(), [0, 1]);
        assert!(KeyMaterial::from_base64("A*E=").is_err());
        let err = serde_json::from_str::<Key>(r#"{"key_ID":"x","key":"secret!!"}"#).expect_err("invalid");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn key_material_equality() {
        assert_eq!(KeyMaterial::from(vec![1, 2]), KeyMaterial::from(vec![1, 2]));
        assert_ne!(KeyMaterial::from(vec![1, 2]), KeyMaterial::from(vec![1, 3]));
        assert_ne!(KeyMaterial::from(vec![1, 2]), KeyMaterial::from(vec![1, 2, 0]));
    }
}
