//! Builds the Kinesis client: region, endpoint, proxy, TLS, timeouts and credentials.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
use aws_smithy_runtime_api::client::http::SharedHttpClient;

use crate::config::{Credentials, ProducerConfig};

/// The user agent suffix every request carries.
pub const USER_AGENT: &str = concat!("fluent-plugin-kinesis-rs/", env!("CARGO_PKG_VERSION"));

fn http_client(config: &ProducerConfig) -> Result<SharedHttpClient, String> {
    let mut trust = TrustStore::default();
    if let Some(path) = &config.ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read ssl_ca_file {path}: {e}"))?;
        trust = trust.with_pem_certificate(pem);
    }
    let tls_context = TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let proxy = match &config.http_proxy {
        Some(url) => ProxyConfig::all(url.as_str())
            .map_err(|e| format!("http_proxy {}: {e}", redact_url(url)))?,
        // Honour HTTP(S)_PROXY / NO_PROXY from the environment, as the Ruby SDK does.
        None => ProxyConfig::from_env(),
    };
    Ok(
        aws_smithy_http_client::Builder::new().build_with_connector_fn(
            move |settings, components| {
                let mut b = aws_smithy_http_client::Connector::builder();
                b.set_connector_settings(settings.cloned());
                if let Some(c) = components {
                    b.set_sleep_impl(c.sleep_impl());
                }
                b.set_proxy_config(Some(proxy.clone()));
                b.tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
                    .tls_context(tls_context.clone())
                    .build()
            },
        ),
    )
}

/// `http://user:secret@host` → `http://***@host`, so proxy credentials never reach a log.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

async fn base_config(config: &ProducerConfig, http: SharedHttpClient) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        // Retries are ours: per entry, visible in the counters, bounded by the deadline.
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(config.connect_timeout)
                .operation_attempt_timeout(config.request_timeout)
                .build(),
        );
    if let Some(region) = &config.region {
        loader = loader.region(Region::new(region.clone()));
    }
    loader.load().await
}

fn boxed(
    p: impl aws_credential_types::provider::ProvideCredentials + 'static,
) -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(p)
}

/// The settings credentials providers calling AWS (STS) use: the plugin's region and HTTP
/// client. (IMDS and the ECS endpoint are local and keep their own clients, never proxied.)
fn provider_config(sdk: &SdkConfig) -> aws_config::provider_config::ProviderConfig {
    let mut c =
        aws_config::provider_config::ProviderConfig::default().with_region(sdk.region().cloned());
    if let Some(http) = sdk.http_client() {
        c = c.with_http_client(http);
    }
    c
}

/// Resolves the configured credentials into a provider. `None` means the default chain.
// ProfileFiles is the name aws-config's own builder takes; its replacement lives in a crate we
// would otherwise not depend on.
#[allow(deprecated)]
fn credentials_provider<'a>(
    creds: &'a Credentials,
    sdk: &'a SdkConfig,
) -> std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<Option<SharedCredentialsProvider>, String>>
            + Send
            + 'a,
    >,
> {
    Box::pin(async move {
        use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
        Ok(match creds {
            Credentials::DefaultChain => None,
            Credentials::Static {
                access_key_id,
                secret_access_key,
                session_token,
            } => Some(boxed(aws_credential_types::Credentials::new(
                access_key_id,
                secret_access_key,
                session_token.clone(),
                None,
                "fluent-plugin-kinesis-rs-static",
            ))),
            Credentials::Profile { path, profile_name } => {
                // A profile may assume a role: its STS calls go through the plugin's HTTP
                // client (proxy, CA file, timeouts) like every other call.
                let mut b = aws_config::profile::ProfileFileCredentialsProvider::builder()
                    .configure(&provider_config(sdk));
                if let Some(path) = path {
                    b = b.profile_files(
                        ProfileFiles::builder()
                            .with_file(ProfileFileKind::Credentials, path)
                            .build(),
                    );
                }
                if let Some(name) = profile_name {
                    b = b.profile_name(name);
                }
                Some(boxed(b.build()))
            }
            Credentials::AssumeRole {
                role_arn,
                session_name,
                external_id,
                policy,
                duration,
                sts_endpoint,
                sts_region,
                source,
            } => {
                let mut sts_conf = sdk.clone().into_builder();
                if let Some(url) = sts_endpoint {
                    sts_conf = sts_conf.endpoint_url(url);
                    // Set here, it must win over AWS_ENDPOINT_URL(_STS) and profile endpoints,
                    // which the STS client prefers to settings of unknown origin.
                    sts_conf
                        .insert_origin("endpoint_url", aws_types::origin::Origin::shared_config());
                }
                if let Some(r) = sts_region {
                    sts_conf = sts_conf.region(Region::new(r.clone()));
                }
                let sts_conf = sts_conf.build();
                let mut b = aws_config::sts::AssumeRoleProvider::builder(role_arn)
                    .session_name(session_name)
                    .configure(&sts_conf);
                if let Some(id) = external_id {
                    b = b.external_id(id);
                }
                if let Some(p) = policy {
                    b = b.policy(p);
                }
                if let Some(d) = duration {
                    b = b.session_length(*d);
                }
                let provider = match credentials_provider(source, sdk).await? {
                    Some(src) => b.build_from_provider(src).await,
                    None => b.build().await,
                };
                Some(boxed(provider))
            }
            Credentials::WebIdentity {
                role_arn,
                session_name,
                token_file,
                policy,
            } => {
                let mut b =
                    aws_config::web_identity_token::WebIdentityTokenCredentialsProvider::builder()
                        .configure(&provider_config(sdk))
                        .static_configuration(
                            aws_config::web_identity_token::StaticConfiguration {
                                web_identity_token_file: token_file.into(),
                                role_arn: role_arn.clone(),
                                session_name: session_name.clone(),
                            },
                        );
                if let Some(p) = policy {
                    b = b.policy(p);
                }
                Some(boxed(b.build()))
            }
            Credentials::Ecs => Some(boxed(
                aws_config::ecs::EcsCredentialsProvider::builder().build(),
            )),
            Credentials::InstanceProfile {
                endpoint,
                retries,
                connect_timeout,
                read_timeout,
            } => {
                let mut c = aws_config::imds::client::Client::builder();
                if let Some(e) = endpoint {
                    c = c
                        .endpoint(e)
                        .map_err(|e| format!("instance_profile_credentials endpoint: {e}"))?;
                }
                if let Some(r) = retries {
                    c = c.max_attempts(r + 1);
                }
                if let Some(t) = connect_timeout {
                    c = c.connect_timeout(*t);
                }
                if let Some(t) = read_timeout {
                    c = c.read_timeout(*t);
                }
                Some(boxed(
                    aws_config::imds::credentials::ImdsCredentialsProvider::builder()
                        .imds_client(c.build())
                        .build(),
                ))
            }
            Credentials::Process { command } => Some(boxed(
                aws_config::credential_process::CredentialProcessProvider::new(command.clone()),
            )),
        })
    })
}

/// The clients a producer talks through. They share one credentials provider (and so one
/// credentials cache) and one HTTP client.
pub struct Clients {
    pub kinesis: aws_sdk_kinesis::Client,
    /// Only when CloudWatch metrics are on.
    pub cloudwatch: Option<aws_sdk_cloudwatch::Client>,
    /// Only for a Firehose destination.
    pub firehose: Option<aws_sdk_firehose::Client>,
}

/// Builds the clients for `config`. Needs a tokio runtime.
pub async fn build_clients(config: &ProducerConfig) -> Result<Clients, String> {
    let http = http_client(config)?;
    let sdk = base_config(config, http).await;
    let provider = credentials_provider(&config.credentials, &sdk).await?;
    if sdk.region().is_none() {
        return Err("no AWS region: set `region` (or AWS_REGION)".into());
    }
    let suffix = match &config.user_agent_suffix {
        Some(s) => format!("{USER_AGENT} {s}"),
        None => USER_AGENT.to_string(),
    };
    let app = aws_config::AppName::new(sanitize_app_name(&suffix))
        .map_err(|e| format!("user agent: {e}"))?;

    let mut b = aws_sdk_kinesis::config::Builder::from(&sdk).app_name(app.clone());
    // The same SharedCredentialsProvider, not a new wrapper as `credentials_provider` makes:
    // it keys the config's one identity cache, so Kinesis and CloudWatch share cached
    // credentials and refresh them once.
    b.set_credentials_provider(provider.clone());
    if let Some(endpoint) = &config.endpoint {
        b = b.endpoint_url(endpoint);
    }
    let kinesis = aws_sdk_kinesis::Client::from_conf(b.build());

    let firehose = config.destination.is_firehose().then(|| {
        let mut b = aws_sdk_firehose::config::Builder::from(&sdk).app_name(app.clone());
        b.set_credentials_provider(provider.clone());
        if let Some(endpoint) = &config.endpoint {
            b = b.endpoint_url(endpoint);
        }
        aws_sdk_firehose::Client::from_conf(b.build())
    });

    let cloudwatch = config.metrics.enabled().then(|| {
        let m = &config.metrics;
        let mut b = aws_sdk_cloudwatch::config::Builder::from(&sdk)
            .app_name(app)
            .disable_request_compression(!m.request_compression);
        // The same provider as Kinesis's: the same credentials cache entry.
        b.set_credentials_provider(provider.clone());
        if let Some(endpoint) = &m.endpoint {
            b = b.endpoint_url(endpoint);
        }
        if let Some(region) = &m.region {
            b = b.region(Region::new(region.clone()));
        }
        aws_sdk_cloudwatch::Client::from_conf(b.build())
    });
    Ok(Clients {
        kinesis,
        cloudwatch,
        firehose,
    })
}

/// The SDK's app name allows a restricted character set: keep what it allows.
fn sanitize_app_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(50)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_proxy_credentials() {
        assert_eq!(
            redact_url("http://user:pw@proxy:3128"),
            "http://***@proxy:3128"
        );
        assert_eq!(redact_url("http://proxy:3128"), "http://proxy:3128");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = Credentials::Static {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI".into(),
            session_token: Some("FQoGZXIvYXdzE".into()),
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("AKID") && !shown.contains("wJal") && !shown.contains("FQoG"),
            "{shown}"
        );
    }
}
