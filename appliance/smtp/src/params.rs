//! ESMTP parameters of `MAIL FROM` and `RCPT TO`: SIZE (RFC 1870), BODY (RFC 6152), DSN
//! (RFC 3461: RET, ENVID, NOTIFY, ORCPT), SMTPUTF8 (RFC 6531) and AUTH= (RFC 4954 § 5).

/// `BODY=` (RFC 6152; BINARYMIME needs CHUNKING, which is not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    /// `7BIT` or no parameter.
    #[default]
    SevenBit,
    /// `8BITMIME`.
    EightBitMime,
}

/// `RET=` (RFC 3461 § 4.3): how much of the message a DSN should return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnReturn {
    /// `FULL`: the whole message.
    Full,
    /// `HDRS`: only the headers.
    Headers,
}

/// `NOTIFY=` (RFC 3461 § 4.1): when to send DSNs for a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DsnNotify {
    /// `NEVER`: no DSN at all (exclusive with the others).
    pub never: bool,
    /// `SUCCESS`.
    pub success: bool,
    /// `FAILURE`.
    pub failure: bool,
    /// `DELAY`.
    pub delay: bool,
}

/// `ORCPT=` (RFC 3461 § 4.2): the original recipient, `addr-type;xtext`, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalRecipient {
    /// The address type, e.g. `rfc822` or `utf-8`.
    pub addr_type: String,
    /// The decoded address.
    pub address: String,
}

/// Parameters of `MAIL FROM`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailParams {
    /// Declared message size (`SIZE=`), in octets.
    pub size: Option<u64>,
    /// Declared body type.
    pub body: BodyType,
    /// `RET=`.
    pub ret: Option<DsnReturn>,
    /// `ENVID=`, xtext-decoded.
    pub envid: Option<String>,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
    /// `AUTH=` (RFC 4954 § 5), xtext-decoded; `<>` is kept as is.
    pub auth: Option<String>,
}

/// Parameters of `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RcptParams {
    /// `NOTIFY=`.
    pub notify: Option<DsnNotify>,
    /// `ORCPT=`.
    pub orcpt: Option<OriginalRecipient>,
}

/// Why an ESMTP parameter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// The keyword is not one this server supports.
    #[error("parameter {0} is not supported")]
    Unknown(String),
    /// The parameter appears twice.
    #[error("parameter {0} given more than once")]
    Duplicate(&'static str),
    /// The value is malformed.
    #[error("invalid value for {keyword}: {reason}")]
    Invalid {
        /// The parameter.
        keyword: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

fn split(param: &str) -> (String, Option<&str>) {
    match param.split_once('=') {
        Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
        None => (param.to_ascii_uppercase(), None),
    }
}

fn required<'a>(keyword: &'static str, value: Option<&'a str>) -> Result<&'a str, ParamError> {
    value.filter(|v| !v.is_empty()).ok_or(ParamError::Invalid { keyword, reason: "a value is required" })
}

/// Decodes RFC 3461 § 4 xtext (`+XX` hex escapes; printable ASCII otherwise).
pub fn decode_xtext(keyword: &'static str, value: &str) -> Result<String, ParamError> {
    let invalid = |reason| ParamError::Invalid { keyword, reason };
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                let hex = value.get(i + 1..i + 3).ok_or(invalid("truncated +XX escape"))?;
                let byte = u8::from_str_radix(hex, 16).map_err(|_| invalid("bad +XX escape"))?;
                out.push(byte);
                i += 3;
            }
            b'!'..=b'~' if bytes[i] != b'=' => {
                out.push(bytes[i]);
                i += 1;
            }
            _ => return Err(invalid("characters outside xtext")),
        }
    }
    String::from_utf8(out).map_err(|_| invalid("escapes do not decode to UTF-8"))
}

/// Parses the parameters after `MAIL FROM:<path>`. `smtputf8_offered` allows `SMTPUTF8`.
pub fn parse_mail_params<'a>(
    params: impl Iterator<Item = &'a str>,
    smtputf8_offered: bool,
) -> Result<MailParams, ParamError> {
    let mut out = MailParams::default();
    let mut seen_body = false;
    for param in params {
        let (keyword, value) = split(param);
        match keyword.as_str() {
            "SIZE" => {
                if out.size.is_some() {
                    return Err(ParamError::Duplicate("SIZE"));
                }
                let v = required("SIZE", value)?;
                let size = v
                    .parse::<u64>()
                    .ok()
                    .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or(ParamError::Invalid { keyword: "SIZE", reason: "not a decimal number" })?;
                out.size = Some(size);
            }
            "BODY" => {
                if seen_body {
                    return Err(ParamError::Duplicate("BODY"));
                }
                seen_body = true;
                out.body = match required("BODY", value)?.to_ascii_uppercase().as_str() {
                    "7BIT" => BodyType::SevenBit,
                    "8BITMIME" => BodyType::EightBitMime,
                    _ => {
                        return Err(ParamError::Invalid {
                            keyword: "BODY",
                            reason: "expected 7BIT or 8BITMIME",
                        });
                    }
                };
            }
            "RET" => {
                if out.ret.is_some() {
                    return Err(ParamError::Duplicate("RET"));
                }
                out.ret = Some(match required("RET", value)?.to_ascii_uppercase().as_str() {
                    "FULL" => DsnReturn::Full,
                    "HDRS" => DsnReturn::Headers,
                    _ => return Err(ParamError::Invalid { keyword: "RET", reason: "expected FULL or HDRS" }),
                });
            }
            "ENVID" => {
                if out.envid.is_some() {
                    return Err(ParamError::Duplicate("ENVID"));
                }
                let v = decode_xtext("ENVID", required("ENVID", value)?)?;
                if v.len() > 100 {
                    return Err(ParamError::Invalid {
                        keyword: "ENVID",
                        reason: "longer than 100 characters",
                    });
                }
                out.envid = Some(v);
            }
            "SMTPUTF8" if smtputf8_offered => {
                if value.is_some() {
                    return Err(ParamError::Invalid { keyword: "SMTPUTF8", reason: "takes no value" });
                }
                out.smtputf8 = true;
            }
            "AUTH" => {
                if out.auth.is_some() {
                    return Err(ParamError::Duplicate("AUTH"));
                }
                out.auth = Some(decode_xtext("AUTH", required("AUTH", value)?)?);
            }
            _ => return Err(ParamError::Unknown(keyword)),
        }
    }
    Ok(out)
}

/// Parses the parameters after `RCPT TO:<path>`.
pub fn parse_rcpt_params<'a>(params: impl Iterator<Item = &'a str>) -> Result<RcptParams, ParamError> {
    let mut out = RcptParams::default();
    for param in params {
        let (keyword, value) = split(param);
        match keyword.as_str() {
            "NOTIFY" => {
                if out.notify.is_some() {
                    return Err(ParamError::Duplicate("NOTIFY"));
                }
                let mut notify = DsnNotify::default();
                for item in required("NOTIFY", value)?.split(',') {
                    match item.to_ascii_uppercase().as_str() {
                        "NEVER" => notify.never = true,
                        "SUCCESS" => notify.success = true,
                        "FAILURE" => notify.failure = true,
                        "DELAY" => notify.delay = true,
                        _ => {
                            return Err(ParamError::Invalid {
                                keyword: "NOTIFY",
                                reason: "expected NEVER or a list of SUCCESS, FAILURE, DELAY",
                            });
                        }
                    }
                }
                if notify.never && (notify.success || notify.failure || notify.delay) {
                    return Err(ParamError::Invalid {
                        keyword: "NOTIFY",
                        reason: "NEVER cannot be combined with other values",
                    });
                }
                out.notify = Some(notify);
            }
            "ORCPT" => {
                if out.orcpt.is_some() {
                    return Err(ParamError::Duplicate("ORCPT"));
                }
                let (addr_type, xtext) = required("ORCPT", value)?
                    .split_once(';')
                    .ok_or(ParamError::Invalid { keyword: "ORCPT", reason: "expected addr-type;address" })?;
                if addr_type.is_empty() || !addr_type.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(ParamError::Invalid { keyword: "ORCPT", reason: "invalid address type" });
                }
                out.orcpt = Some(OriginalRecipient {
                    addr_type: addr_type.to_ascii_lowercase(),
                    address: decode_xtext("ORCPT", xtext)?,
                });
            }
            _ => return Err(ParamError::Unknown(keyword)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_parameters_are_parsed_and_decoded() {
        let p = parse_mail_params(
            ["SIZE=1000", "body=8bitmime", "RET=HDRS", "ENVID=QQ+2B1", "SMTPUTF8", "AUTH=<>"].into_iter(),
            true,
        )
        .unwrap();
        assert_eq!(p.size, Some(1000));
        assert_eq!(p.body, BodyType::EightBitMime);
        assert_eq!(p.ret, Some(DsnReturn::Headers));
        assert_eq!(p.envid.as_deref(), Some("QQ+1"));
        assert!(p.smtputf8);
        assert_eq!(p.auth.as_deref(), Some("<>"));
    }

    #[test]
    fn bad_mail_parameters_are_refused_with_the_reason() {
        let one = |p: &str, utf8| parse_mail_params(std::iter::once(p), utf8);
        assert_eq!(
            one("SIZE=-1", true).unwrap_err().to_string(),
            "invalid value for SIZE: not a decimal number"
        );
        assert!(matches!(one("BODY=BINARYMIME", true), Err(ParamError::Invalid { keyword: "BODY", .. })));
        assert_eq!(one("SMTPUTF8", false), Err(ParamError::Unknown("SMTPUTF8".into())));
        assert_eq!(one("XFOO=1", true), Err(ParamError::Unknown("XFOO".into())));
        assert!(matches!(one("ENVID=a+Z", true), Err(ParamError::Invalid { keyword: "ENVID", .. })));
        assert_eq!(
            parse_mail_params(["SIZE=1", "SIZE=2"].into_iter(), true),
            Err(ParamError::Duplicate("SIZE"))
        );
    }

    #[test]
    fn rcpt_parameters_are_parsed_and_checked() {
        let p = parse_rcpt_params(["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;bob+40example.org"].into_iter())
            .unwrap();
        assert_eq!(p.notify, Some(DsnNotify { success: true, delay: true, ..DsnNotify::default() }));
        assert_eq!(
            p.orcpt,
            Some(OriginalRecipient { addr_type: "rfc822".into(), address: "bob@example.org".into() })
        );
        assert!(parse_rcpt_params(std::iter::once("NOTIFY=NEVER,FAILURE")).is_err());
        assert!(parse_rcpt_params(std::iter::once("ORCPT=bob@example.org")).is_err());
    }
}
