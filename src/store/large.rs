//! Responses whose record would exceed DynamoDB's 400 KB item limit: the forms
//! [`DynamoDbStore`](super::DynamoDbStore) stores them in, and how it reads them
//! back (the guide's [large responses](crate::guide::large_responses) chapter).
//!
//! A record that fits is written exactly as before, `data` holding the JSON text.
//! Only a record item over the limit changes form, marked by the
//! [`data_encoding`](super::AttributeNames::data_encoding) attribute:
//!
//! | `data_encoding` | `data` | when |
//! |---|---|---|
//! | (absent) | S: the JSON text | the item fits |
//! | `gzip` | B: the JSON text, gzip-compressed | feature `compress-responses`, and the compressed item fits |
//! | `s3`, `s3+gzip` | S: `s3://{bucket}/{object key}`, the object holding the text (`s3+gzip`: compressed) | feature `s3-responses` and a bucket (`DynamoDbStore::with_response_bucket`) |
//!
//! Otherwise the write is refused with [`StoreError::TooLarge`], as without the
//! features.
//!
//! The object is written before the record that points at it, under a key unique
//! to the attempt (`{hash part of the record key}/{owner token}.json[.gz]`): the
//! completing write is conditional on the owner token, so only the attempt that
//! completed the record is ever pointed at, and the object of an attempt that
//! crashed between its `PutObject` and its completion is read by no one (the
//! bucket's lifecycle rule deletes it).

#[cfg(feature = "s3-responses")]
use super::{sdk_detail, StoreError};

/// The `data_encoding` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// `data` is binary, the gzip-compressed JSON text.
    Gzip,
    /// `data` points at an S3 object holding the JSON text.
    S3,
    /// `data` points at an S3 object holding the gzip-compressed JSON text.
    S3Gzip,
}

impl Encoding {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::S3 => "s3",
            Encoding::S3Gzip => "s3+gzip",
        }
    }

    pub(crate) fn parse(value: &str) -> Option<Self> {
        match value {
            "gzip" => Some(Encoding::Gzip),
            "s3" => Some(Encoding::S3),
            "s3+gzip" => Some(Encoding::S3Gzip),
            _ => None,
        }
    }

    /// The Cargo feature a build needs to read this form.
    pub(crate) fn feature(self) -> &'static str {
        match self {
            Encoding::Gzip => "compress-responses",
            Encoding::S3 | Encoding::S3Gzip => "s3-responses",
        }
    }
}

/// Where a record's response is, in S3: parsed from `s3://{bucket}/{key}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObjectRef {
    pub(crate) bucket: String,
    pub(crate) key: String,
    /// Whether the object holds the compressed text (`s3+gzip`).
    pub(crate) gzip: bool,
}

impl ObjectRef {
    /// Parses a stored pointer strictly: `s3://`, a bucket name without `/`, a
    /// non-empty key. `None` for anything else.
    pub(crate) fn parse(pointer: &str, gzip: bool) -> Option<Self> {
        let (bucket, key) = pointer.strip_prefix("s3://")?.split_once('/')?;
        (!bucket.is_empty() && !key.is_empty()).then(|| ObjectRef {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            gzip,
        })
    }

    /// The pointer stored in `data`.
    #[cfg_attr(not(feature = "s3-responses"), allow(dead_code))]
    pub(crate) fn pointer(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// The object key of one attempt's response: the record key's hash part (the
/// text after its last `#`, when it is plain hex or alphanumeric; otherwise a
/// SHA-256 of the whole key), then the reservation's owner token, unique to the
/// attempt.
#[cfg_attr(not(feature = "s3-responses"), allow(dead_code))]
pub(crate) fn object_key(record_key: &str, owner: &str, gzip: bool) -> String {
    use sha2::Digest;
    let safe = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    let hash = match record_key.rsplit_once('#') {
        Some((_, hash)) if safe(hash) => hash.to_owned(),
        _ => sha2::Sha256::digest(record_key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    };
    let owner = if safe(owner) {
        owner.to_owned()
    } else {
        sha2::Sha256::digest(owner.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let suffix = if gzip { ".json.gz" } else { ".json" };
    format!("{hash}/{owner}{suffix}")
}

/// `text`, gzip-compressed (flate2's default level).
#[cfg(feature = "compress-responses")]
pub(crate) fn gzip(text: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 4),
        flate2::Compression::default(),
    );
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(text);
    encoder.finish().unwrap_or_default()
}

/// The text a gzip form holds; `Err` names what is wrong with it.
#[cfg(feature = "compress-responses")]
pub(crate) fn gunzip(compressed: &[u8]) -> Result<String, &'static str> {
    use std::io::Read;
    let mut text = Vec::with_capacity(compressed.len().saturating_mul(4));
    flate2::read::GzDecoder::new(compressed)
        .read_to_end(&mut text)
        .map_err(|_| "is not valid gzip")?;
    String::from_utf8(text).map_err(|_| "does not decompress to UTF-8 text")
}

/// A failed S3 request, with the service's error code and message in its text.
#[cfg(feature = "s3-responses")]
#[derive(Debug, thiserror::Error)]
#[error("S3 {operation} of {object} failed: {detail}")]
pub(crate) struct S3Error {
    operation: &'static str,
    object: String,
    detail: String,
    #[source]
    source: Option<aws_sdk_s3::error::BoxError>,
}

#[cfg(feature = "s3-responses")]
impl S3Error {
    fn store_error<E, R>(
        operation: &'static str,
        object: &ObjectRef,
        err: SdkError<E, R>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        StoreError::Backend(Box::new(S3Error {
            operation,
            object: object.pointer(),
            detail: sdk_detail(&err),
            source: Some(err.into()),
        }))
    }
}

#[cfg(feature = "s3-responses")]
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

/// The bucket a [`DynamoDbStore`](super::DynamoDbStore) stores responses in
/// when even their compressed record would exceed 400 KB.
#[cfg(feature = "s3-responses")]
#[derive(Debug, Clone)]
pub(crate) struct ResponseBucket {
    pub(crate) client: aws_sdk_s3::Client,
    pub(crate) bucket: String,
}

#[cfg(feature = "s3-responses")]
impl ResponseBucket {
    /// Writes one attempt's response (one `PutObject`).
    pub(crate) async fn put(&self, object: &ObjectRef, body: Vec<u8>) -> Result<(), StoreError> {
        let content_type = if object.gzip {
            "application/gzip"
        } else {
            "application/json"
        };
        self.client
            .put_object()
            .bucket(&object.bucket)
            .key(&object.key)
            .content_type(content_type)
            .body(aws_sdk_s3::primitives::ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|err| S3Error::store_error("PutObject", object, err))
    }

    /// Reads a response back (one `GetObject`). `Ok(None)` when the object does
    /// not exist.
    pub(crate) async fn get(&self, object: &ObjectRef) -> Result<Option<Vec<u8>>, StoreError> {
        let output = match self
            .client
            .get_object()
            .bucket(&object.bucket)
            .key(&object.key)
            .send()
            .await
        {
            Ok(output) => output,
            Err(err) if err.as_service_error().is_some_and(|e| e.is_no_such_key()) => {
                return Ok(None)
            }
            Err(err) => return Err(S3Error::store_error("GetObject", object, err)),
        };
        let body = output.body.collect().await.map_err(|err| {
            StoreError::Backend(Box::new(S3Error {
                operation: "GetObject (reading the body)",
                object: object.pointer(),
                detail: err.to_string(),
                source: Some(Box::new(err)),
            }))
        })?;
        Ok(Some(body.into_bytes().to_vec()))
    }
}

/// A record pointing at S3, read by a store without a response bucket.
#[cfg(feature = "s3-responses")]
pub(crate) fn no_bucket(object: &ObjectRef) -> StoreError {
    StoreError::Backend(Box::new(S3Error {
        operation: "GetObject",
        object: object.pointer(),
        detail: "the record's response is in S3 and this DynamoDbStore has no S3 client: \
                 configure it with DynamoDbStore::with_response_bucket"
            .into(),
        source: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_and_unknown_ones_are_refused() {
        for e in [Encoding::Gzip, Encoding::S3, Encoding::S3Gzip] {
            assert_eq!(Encoding::parse(e.as_str()), Some(e));
        }
        for bad in ["", "GZIP", "zstd", "s3+zstd", " gzip"] {
            assert_eq!(Encoding::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn pointers_parse_strictly() {
        let parsed = ObjectRef::parse("s3://bucket/abc/def.json.gz", true).expect("valid");
        assert_eq!(parsed.bucket, "bucket");
        assert_eq!(parsed.key, "abc/def.json.gz");
        assert_eq!(parsed.pointer(), "s3://bucket/abc/def.json.gz");
        for bad in [
            "",
            "s3://",
            "s3://bucket",
            "s3://bucket/",
            "s3:///key",
            "https://bucket/key",
            "bucket/key",
        ] {
            assert_eq!(ObjectRef::parse(bad, false), None, "{bad:?}");
        }
    }

    #[test]
    fn object_keys_are_unique_to_the_attempt() {
        let key = "orders#0123abcd";
        assert_eq!(object_key(key, "ownerA", false), "0123abcd/ownerA.json");
        assert_eq!(object_key(key, "ownerB", true), "0123abcd/ownerB.json.gz");
        // A key without a plain hash part, and an owner with other characters,
        // are hashed rather than put in the object key.
        let odd = object_key("no hash here", "a/b", false);
        assert!(!odd.contains(' ') && !odd.contains("a/b"), "{odd}");
        assert_eq!(odd.matches('/').count(), 1, "{odd}");
    }

    #[cfg(feature = "compress-responses")]
    #[test]
    fn gzip_round_trips_and_refuses_garbage() {
        let text = "{\"a\":\"ü\"}".repeat(1000);
        assert_eq!(gunzip(&gzip(text.as_bytes())).as_deref(), Ok(text.as_str()));
        assert_eq!(gunzip(b"not gzip"), Err("is not valid gzip"));
        assert_eq!(
            gunzip(&gzip(&[0xff, 0xfe])),
            Err("does not decompress to UTF-8 text")
        );
    }
}
