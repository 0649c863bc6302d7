//! How a failed delivery is classified, and what a person should do about it.

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};

/// What kind of failure kept a record from being delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The shard or the account was over its limits (ProvisionedThroughputExceeded, KMS
    /// throttling, LimitExceeded): retrying later succeeds.
    Throttled,
    /// A passing fault: 5xx, InternalFailure, timeouts, connection errors, a shard map that
    /// changed under the producer. Retrying later succeeds.
    Transient,
    /// Something a person must fix first: stream missing, access denied, KMS key disabled,
    /// credentials refused. Retrying helps only after the fix.
    NeedsAttention,
    /// The request itself is invalid (validation errors): retrying the same records never helps.
    Invalid,
    /// The caller cancelled the delivery (shutdown, thread killed) before it finished.
    Cancelled,
}

impl FailureKind {
    pub fn is_retryable_now(self) -> bool {
        matches!(self, FailureKind::Throttled | FailureKind::Transient)
    }

    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Throttled => "throttled",
            FailureKind::Transient => "transient",
            FailureKind::NeedsAttention => "needs_attention",
            FailureKind::Invalid => "invalid",
            FailureKind::Cancelled => "cancelled",
        }
    }
}

/// One reason records were not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// The service's error code, or a short name of our own (`Timeout`, `ConnectionError`...).
    pub code: String,
    /// What happened, and where it helps, what to do.
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, code: impl Into<String>, message: impl Into<String>) -> Self {
        Failure {
            kind,
            code: code.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.kind.name(), self.message)
    }
}

/// The service a call went to: it decides some codes' meaning and what a person should check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Kinesis,
    Firehose,
}

/// Advice appended to messages of errors a person has to act on.
fn advice(service: Service, code: &str) -> &'static str {
    if service == Service::Firehose {
        return match code {
            "ResourceNotFoundException" => " Check delivery_stream_name and region (and endpoint): the delivery stream does not exist there, or is being deleted.",
            "AccessDeniedException" | "UnrecognizedClientException" | "InvalidSignatureException" | "IncompleteSignature" | "MissingAuthenticationToken" | "InvalidClientTokenId" | "SignatureDoesNotMatch" => {
                " Check the credentials and the IAM policy: it needs firehose:PutRecordBatch and firehose:DescribeDeliveryStream on the delivery stream."
            }
            c if c.starts_with("KMS") || c == "InvalidKMSResourceException" => " The delivery stream's KMS key is disabled, missing or not usable: fix the key or its policy.",
            "ResourceInUseException" => " The delivery stream is not ACTIVE yet (being created or updated).",
            "InvalidSourceException" => " The delivery stream reads from a Kinesis data stream: it takes no direct PUT. Send to the data stream instead (kinesis_streams), or use a direct PUT delivery stream.",
            _ => "",
        };
    }
    match code {
        "ResourceNotFoundException" => " Check stream_name and region (and endpoint): the stream does not exist there, or is being deleted.",
        "AccessDeniedException" | "UnrecognizedClientException" | "InvalidSignatureException" | "IncompleteSignature" | "MissingAuthenticationToken" | "InvalidClientTokenId" | "SignatureDoesNotMatch" => {
            " Check the credentials and the IAM policy: it needs kinesis:PutRecords, kinesis:ListShards and kinesis:DescribeStreamSummary on the stream (and kms:GenerateDataKey on its key when the stream is encrypted)."
        }
        c if c.starts_with("KMS") => " The stream's KMS key is disabled, missing or not usable by these credentials: fix the key or its policy.",
        "ResourceInUseException" => " The stream is not ACTIVE yet (being created or updated).",
        _ => "",
    }
}

/// Classifies an error code returned for a whole request or for one PutRecords entry.
pub fn classify_code(code: &str, http_status: Option<u16>, message: &str) -> Failure {
    classify_code_for(Service::Kinesis, code, http_status, message)
}

/// Classifies an error code of `service`, for a whole request or one entry of a batch call.
/// Firehose answers ServiceUnavailableException when a delivery stream is over its throughput
/// limits, so it counts as throttling there.
pub fn classify_code_for(
    service: Service,
    code: &str,
    http_status: Option<u16>,
    message: &str,
) -> Failure {
    let kind = match code {
        "ServiceUnavailableException" if service == Service::Firehose => FailureKind::Throttled,
        "InvalidSourceException" | "InvalidKMSResourceException" => FailureKind::NeedsAttention,
        "ProvisionedThroughputExceededException"
        | "LimitExceededException"
        | "KMSThrottlingException"
        | "ThrottlingException"
        | "Throttling"
        | "RequestLimitExceeded"
        | "TooManyRequestsException" => FailureKind::Throttled,
        "InternalFailure"
        | "InternalFailureException"
        | "InternalServerError"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "RequestTimeout"
        | "RequestTimeoutException"
        | "ExpiredTokenException"
        | "ExpiredToken"
        | "RequestExpired"
        | "IDPCommunicationError" => FailureKind::Transient,
        "ResourceNotFoundException"
        | "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "ResourceInUseException"
        | "KMSDisabledException"
        | "KMSInvalidStateException"
        | "KMSAccessDeniedException"
        | "KMSNotFoundException"
        | "KMSOptInRequired" => FailureKind::NeedsAttention,
        "ValidationException" | "InvalidArgumentException" | "SerializationException" => {
            FailureKind::Invalid
        }
        _ => match http_status {
            Some(429) => FailureKind::Throttled,
            Some(s) if s >= 500 => FailureKind::Transient,
            Some(s) if (400..500).contains(&s) => FailureKind::NeedsAttention,
            _ => FailureKind::Transient,
        },
    };
    let code = if code.is_empty() {
        http_status.map_or("UnknownError".to_string(), |s| format!("HTTP{s}"))
    } else {
        code.to_string()
    };
    let message = format!("{}{}", message.trim(), advice(service, &code));
    Failure::new(kind, code, message)
}

/// An error and its causes, joined by ": ", each by its Display form only. The SDK's Debug
/// forms (which `DisplayErrorContext` appends) carry raw HTTP responses, whose bodies can hold
/// credentials (an IMDS session token, an STS answer): they never reach a log.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// Classifies an error the SDK returned for a whole Kinesis call.
pub fn classify_sdk_error<E, R>(err: &SdkError<E, R>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus + 'static,
{
    classify_sdk_error_for(Service::Kinesis, err)
}

/// Classifies an error the SDK returned for a whole call to `service`.
pub fn classify_sdk_error_for<E, R>(service: Service, err: &SdkError<E, R>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus + 'static,
{
    match err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            let status = se.raw().status_code();
            let message = e
                .message()
                .map(str::to_string)
                .unwrap_or_else(|| error_chain(e));
            classify_code_for(service, e.code().unwrap_or(""), Some(status), &message)
        }
        SdkError::TimeoutError(_) => Failure::new(
            FailureKind::Transient,
            "Timeout",
            format!("the request timed out: {}", error_chain(err)),
        ),
        SdkError::DispatchFailure(d) => {
            let code = if d.is_timeout() {
                "Timeout"
            } else if d.is_io() {
                "ConnectionError"
            } else {
                "DispatchFailure"
            };
            Failure::new(FailureKind::Transient, code, format!("the request could not be sent (check endpoint, network, proxy and credentials): {}", error_chain(err)))
        }
        SdkError::ResponseError(_) => Failure::new(
            FailureKind::Transient,
            "ResponseError",
            format!("the response could not be read: {}", error_chain(err)),
        ),
        SdkError::ConstructionFailure(_) => Failure::new(
            FailureKind::NeedsAttention,
            "ConstructionFailure",
            format!(
                "the request could not be built (check credentials and region): {}",
                error_chain(err)
            ),
        ),
        _ => Failure::new(FailureKind::Transient, "UnknownError", error_chain(err)),
    }
}

/// The HTTP status of a raw response, whatever the response type.
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_codes() {
        assert_eq!(
            classify_code("ProvisionedThroughputExceededException", None, "x").kind,
            FailureKind::Throttled
        );
        assert_eq!(
            classify_code("InternalFailure", None, "x").kind,
            FailureKind::Transient
        );
        assert_eq!(
            classify_code("KMSDisabledException", None, "x").kind,
            FailureKind::NeedsAttention
        );
        assert_eq!(
            classify_code("KMSThrottlingException", None, "x").kind,
            FailureKind::Throttled
        );
        assert_eq!(
            classify_code("Weird", Some(503), "x").kind,
            FailureKind::Transient
        );
        assert_eq!(classify_code("", Some(403), "x").code, "HTTP403");
        let f = classify_code(
            "ResourceNotFoundException",
            Some(400),
            "Stream s under account 1 not found.",
        );
        assert_eq!(f.kind, FailureKind::NeedsAttention);
        assert!(f.message.contains("Check stream_name"), "{}", f.message);
        let f = classify_code_for(
            Service::Firehose,
            "ResourceNotFoundException",
            Some(400),
            "x",
        );
        assert!(f.message.contains("delivery_stream_name"), "{}", f.message);
        assert_eq!(
            classify_code_for(Service::Firehose, "ServiceUnavailableException", None, "x").kind,
            FailureKind::Throttled
        );
        assert_eq!(
            classify_code("ServiceUnavailableException", None, "x").kind,
            FailureKind::Transient
        );
    }
}
