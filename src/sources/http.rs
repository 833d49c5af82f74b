//! API Gateway requests (REST v1 and HTTP v2) with `Idempotency-Key` header
//! semantics, after the IETF httpapi idempotency-key draft.

use super::field;
use crate::config::ConfigError;
use crate::error::{Error, IdempotencyError};
use crate::idempotency::{Call, CallKey, Executed, Idempotency};
use crate::key::JsonPath;
use crate::store::IdempotencyStore;
use crate::IDEMPOTENCY_KEY;
use aws_lambda_events::apigw::{
    ApiGatewayProxyRequest, ApiGatewayProxyResponse, ApiGatewayV2httpRequest,
    ApiGatewayV2httpResponse,
};
use aws_lambda_events::encodings::Body;
use aws_lambda_events::http::{HeaderMap, HeaderValue};
#[cfg(feature = "lambda-http")]
use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
#[cfg(feature = "lambda-http")]
use lambda_http::{request::RequestContext, RequestExt};
use lambda_runtime::LambdaEvent;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::{Arc, LazyLock};

/// Set to `true` on replayed responses.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Who is calling, by default: the authorizer's principal, JWT subject or IAM user.
static CALLER_V1: LazyLock<JsonPath> = LazyLock::new(|| field(CALLER_V1_EXPRESSION));
static CALLER_V2: LazyLock<JsonPath> = LazyLock::new(|| field(CALLER_V2_EXPRESSION));
const CALLER_V1_EXPRESSION: &str =
    "requestContext.authorizer.principalId || requestContext.authorizer.claims.sub || requestContext.identity.userArn";
const CALLER_V2_EXPRESSION: &str =
    "requestContext.authorizer.jwt.claims.sub || requestContext.authorizer.lambda.principalId \
                         || requestContext.authorizer.iam.userArn";

impl<S: IdempotencyStore> Idempotency<S> {
    /// An API Gateway handler with `Idempotency-Key` semantics: a request carrying
    /// the header runs once; a retry with the same key gets the stored status,
    /// headers and body plus `Idempotent-Replayed: true`.
    ///
    /// | Situation | Response |
    /// |---|---|
    /// | no `Idempotency-Key` header | 400 (or run unprotected, with [`HttpIdempotency::key_optional`]) |
    /// | same key while the first request runs | 409 with `Retry-After` |
    /// | same key, different body | 422 |
    /// | same key, same body, completed | the stored response, replayed |
    ///
    /// Errors are `application/problem+json` (RFC 9457). Keys are scoped by caller
    /// (from the authorizer, see [`HttpIdempotency::caller`]) and route, so one
    /// caller cannot replay another's response. 5xx responses are not stored: a
    /// retry runs again. The config's key expression is not used here.
    ///
    /// Use [`HttpIdempotency::handle_v1`] (REST API), [`HttpIdempotency::handle_v2`]
    /// (HTTP API) or [`HttpIdempotency::handle_request`] (`lambda_http`).
    ///
    /// ```no_run
    /// use aws_lambda_events::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
    /// use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
    /// use lambda_runtime::{service_fn, Error, LambdaEvent};
    ///
    /// async fn create_order(_: ApiGatewayV2httpRequest) -> Result<ApiGatewayV2httpResponse, Error> {
    ///     let mut response = ApiGatewayV2httpResponse::default();
    ///     response.status_code = 201;
    ///     Ok(response)
    /// }
    ///
    /// # async fn run() -> Result<(), Error> {
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    /// let http = idempotency.http("create_order", create_order);
    /// lambda_runtime::run(service_fn(|event: LambdaEvent<ApiGatewayV2httpRequest>| http.handle_v2(event))).await
    /// # }
    /// ```
    pub fn http<F>(&self, name: &str, handler: F) -> HttpIdempotency<F, S> {
        HttpIdempotency {
            handler,
            idempotency: self.clone(),
            scope: self.function_scope(name).into(),
            caller: None,
            require_key: true,
            wait: None,
        }
    }
}

/// An API Gateway handler made idempotent by [`Idempotency::http`].
pub struct HttpIdempotency<F, S> {
    handler: F,
    idempotency: Idempotency<S>,
    scope: Arc<str>,
    caller: Option<JsonPath>,
    require_key: bool,
    wait: Option<std::time::Duration>,
}

impl<F, S> std::fmt::Debug for HttpIdempotency<F, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpIdempotency")
            .field("scope", &self.scope)
            .field("caller", &self.caller)
            .field("require_key", &self.require_key)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl<F, S: IdempotencyStore> HttpIdempotency<F, S> {
    /// A JMESPath expression over the request selecting the caller's identity,
    /// which scopes every key. Rejected here if invalid.
    pub fn caller(mut self, expression: &str) -> Result<Self, ConfigError> {
        let path = JsonPath::compile(expression)
            .map_err(|reason| ConfigError::InvalidExpression {
                role: "caller",
                expression: expression.to_owned(),
                reason,
            })?
            .with_max_inflated_bytes(self.idempotency.config().max_inflated_bytes);
        self.caller = Some(path);
        Ok(self)
    }

    /// Requests without an `Idempotency-Key` run without idempotency instead of
    /// getting a 400.
    pub fn key_optional(mut self) -> Self {
        self.require_key = false;
        self
    }

    /// A request whose key is in flight waits up to `max` for the first request
    /// to finish (as [`IdempotencyConfigBuilder::wait_for_in_progress`]
    /// describes) before it is answered 409: then it gets the first request's
    /// stored response, replayed, or runs when the first one failed. Off by
    /// default, whatever the config says: a client retrying on 409 with
    /// `Retry-After` is the HTTP convention, and API Gateway stops waiting for
    /// the function after 29 seconds by default.
    ///
    /// [`IdempotencyConfigBuilder::wait_for_in_progress`]: crate::IdempotencyConfigBuilder::wait_for_in_progress
    pub fn wait_for_in_progress(mut self, max: std::time::Duration) -> Self {
        self.wait = (!max.is_zero()).then_some(max);
        self
    }

    /// Handles a REST API (payload v1) request.
    pub async fn handle_v1<E, Fut>(
        &self,
        event: LambdaEvent<ApiGatewayProxyRequest>,
    ) -> Result<ApiGatewayProxyResponse, E>
    where
        F: Fn(ApiGatewayProxyRequest) -> Fut,
        Fut: Future<Output = Result<ApiGatewayProxyResponse, E>>,
        E: 'static,
    {
        let LambdaEvent {
            payload: request,
            context,
        } = event;
        let parts = Parts {
            key: idempotency_key(&request.headers),
            route: format!(
                "{} {}",
                request.http_method,
                request.resource.as_deref().unwrap_or_default()
            ),
            body: request.body.clone(),
            caller: self.caller_of(&request, &CALLER_V1),
            deadline_ms: Some(context.deadline as i64),
        };
        self.handle(request, parts, &self.handler).await
    }

    /// Handles an HTTP API (payload v2) request.
    pub async fn handle_v2<E, Fut>(
        &self,
        event: LambdaEvent<ApiGatewayV2httpRequest>,
    ) -> Result<ApiGatewayV2httpResponse, E>
    where
        F: Fn(ApiGatewayV2httpRequest) -> Fut,
        Fut: Future<Output = Result<ApiGatewayV2httpResponse, E>>,
        E: 'static,
    {
        let LambdaEvent {
            payload: request,
            context,
        } = event;
        let route = request
            .route_key
            .clone()
            .or_else(|| request.request_context.route_key.clone());
        let parts = Parts {
            key: idempotency_key(&request.headers),
            route: route.unwrap_or_default(),
            body: request.body.clone(),
            caller: self.caller_of(&request, &CALLER_V2),
            deadline_ms: Some(context.deadline as i64),
        };
        self.handle(request, parts, &self.handler).await
    }

    /// Handles a `lambda_http` request (REST or HTTP API), for
    /// `lambda_http::run(service_fn(|request| http.handle_request(request)))`.
    /// The route in the key is the method and the request path.
    #[cfg(feature = "lambda-http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "lambda-http")))]
    pub async fn handle_request<E, Fut>(
        &self,
        request: lambda_http::Request,
    ) -> Result<lambda_http::Response<Body>, E>
    where
        F: Fn(lambda_http::Request) -> Fut,
        Fut: Future<Output = Result<lambda_http::Response<Body>, E>>,
        E: 'static,
    {
        let context = request.request_context_ref();
        let default_caller = match context {
            Some(RequestContext::ApiGatewayV1(_)) => &CALLER_V1,
            _ => &CALLER_V2,
        };
        let parts = Parts {
            key: idempotency_key(request.headers()),
            route: format!("{} {}", request.method(), request.uri().path()),
            body: match request.body() {
                Body::Empty => None,
                Body::Text(text) => Some(text.clone()),
                binary => Some(BASE64.encode(binary.as_ref() as &[u8])),
            },
            caller: self.caller_of(&json!({ "requestContext": context }), default_caller),
            deadline_ms: request.lambda_context_ref().map(|c| c.deadline as i64),
        };
        // Stored in the HTTP API response shape, which serializes; converted back here.
        let run = |request| async { (self.handler)(request).await.map(to_stored) };
        self.handle(request, parts, run).await.map(from_stored)
    }

    fn caller_of<Req: Serialize>(
        &self,
        request: &Req,
        default: &JsonPath,
    ) -> Result<Value, IdempotencyError> {
        let json = serde_json::to_value(request)
            .map_err(|e| IdempotencyError::InvalidEvent(e.to_string()))?;
        self.caller
            .as_ref()
            .unwrap_or(default)
            .search(&json)
            .map_err(IdempotencyError::InvalidEvent)
    }

    async fn handle<Req, Resp, E, H, Fut>(
        &self,
        request: Req,
        parts: Parts,
        handler: H,
    ) -> Result<Resp, E>
    where
        H: FnOnce(Req) -> Fut,
        Fut: Future<Output = Result<Resp, E>>,
        Resp: HttpResponse,
        E: 'static,
    {
        let Some(key) = parts.key else {
            if self.require_key {
                return Ok(Resp::problem(
                    400,
                    "Idempotency-Key is missing",
                    "This route requires an Idempotency-Key header.",
                ));
            }
            return handler(request).await;
        };
        let caller = match parts.caller {
            Ok(caller) => caller,
            Err(err) => return Ok(Resp::problem(400, "Invalid request", &err.to_string())),
        };

        let call = Call {
            scope: &self.scope,
            deadline_ms: parts.deadline_ms,
            key: CallKey::Given {
                material: json!([caller, parts.route, key]),
                validation: Some(json!(parts.body)),
            },
            wait: self.wait,
            batch: None,
        };
        // The key material is given, so the engine needs no event; the request goes
        // to the handler directly. 5xx responses go back to the engine as failures,
        // so the key is released.
        let run = move |()| async move {
            match handler(request).await {
                Ok(response) if response.status() >= 500 => Err(Failure::Server(response)),
                Ok(response) => Ok(response),
                Err(err) => Err(Failure::Handler(err)),
            }
        };
        match self.idempotency.execute(call, (), run).await {
            Ok(Executed {
                mut response,
                replayed,
            }) => {
                if replayed {
                    response.set_header(IDEMPOTENT_REPLAYED, "true");
                }
                Ok(response)
            }
            Err(Error::Handler(Failure::Server(response))) => Ok(response),
            Err(Error::Handler(Failure::Handler(err))) => Err(err),
            Err(Error::Replayed(err)) => Ok(Resp::problem(500, "Stored error", &err.to_string())),
            Err(Error::Idempotency(err)) => Ok(problem_for(&err)),
        }
    }
}

#[cfg(feature = "lambda-http")]
fn to_stored(response: lambda_http::Response<Body>) -> ApiGatewayV2httpResponse {
    let (parts, body) = response.into_parts();
    let mut stored = ApiGatewayV2httpResponse::default();
    (stored.status_code, stored.headers, stored.body) =
        (i64::from(parts.status.as_u16()), parts.headers, Some(body));
    stored
}

#[cfg(feature = "lambda-http")]
fn from_stored(stored: ApiGatewayV2httpResponse) -> lambda_http::Response<Body> {
    let mut response = lambda_http::Response::new(stored.body.unwrap_or_default());
    // Statuses were valid when stored; an unknown one in a record becomes a 500.
    *response.status_mut() = u16::try_from(stored.status_code)
        .ok()
        .and_then(|code| lambda_http::http::StatusCode::from_u16(code).ok())
        .unwrap_or(lambda_http::http::StatusCode::INTERNAL_SERVER_ERROR);
    *response.headers_mut() = stored.headers;
    response
}

/// What a request brings besides its payload.
struct Parts {
    key: Option<String>,
    route: String,
    body: Option<String>,
    caller: Result<Value, IdempotencyError>,
    deadline_ms: Option<i64>,
}

enum Failure<Resp, E> {
    Server(Resp),
    Handler(E),
}

/// The header's value: a structured-field string (`"abc"`) or a bare token.
fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(IDEMPOTENCY_KEY)?.to_str().ok()?.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    (!value.is_empty()).then(|| value.to_owned())
}

fn problem_for<Resp: HttpResponse>(err: &IdempotencyError) -> Resp {
    let detail = err.to_string();
    match err {
        IdempotencyError::AlreadyInProgress { .. } => {
            let mut response = Resp::problem(409, "Request in progress", &detail);
            response.set_header("retry-after", "1");
            response
        }
        IdempotencyError::PayloadMismatch { .. } => Resp::problem(
            422,
            "Idempotency-Key reused with a different request body",
            &detail,
        ),
        IdempotencyError::MissingKey { .. } | IdempotencyError::InvalidEvent(_) => {
            Resp::problem(400, "Invalid request", &detail)
        }
        IdempotencyError::Store(_) => {
            let mut response = Resp::problem(503, "Idempotency store unavailable", &detail);
            response.set_header("retry-after", "1");
            response
        }
        _ => Resp::problem(500, "Idempotency failure", &detail),
    }
}

/// What this module needs from the v1 and v2 response types.
trait HttpResponse: Serialize + DeserializeOwned + 'static {
    fn status(&self) -> i64;
    fn set_header(&mut self, name: &'static str, value: &'static str);
    fn problem(status: i64, title: &str, detail: &str) -> Self;
}

fn problem_parts(status: i64, title: &str, detail: &str) -> (HeaderMap, Option<Body>) {
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/problem+json"),
    );
    let body = json!({ "type": "about:blank", "title": title, "status": status, "detail": detail });
    (headers, Some(Body::Text(body.to_string())))
}

impl HttpResponse for ApiGatewayProxyResponse {
    fn status(&self) -> i64 {
        self.status_code
    }
    fn set_header(&mut self, name: &'static str, value: &'static str) {
        self.headers.insert(name, HeaderValue::from_static(value));
    }
    fn problem(status: i64, title: &str, detail: &str) -> Self {
        let (headers, body) = problem_parts(status, title, detail);
        let mut response = Self::default();
        (response.status_code, response.headers, response.body) = (status, headers, body);
        response
    }
}

impl HttpResponse for ApiGatewayV2httpResponse {
    fn status(&self) -> i64 {
        self.status_code
    }
    fn set_header(&mut self, name: &'static str, value: &'static str) {
        self.headers.insert(name, HeaderValue::from_static(value));
    }
    fn problem(status: i64, title: &str, detail: &str) -> Self {
        let (headers, body) = problem_parts(status, title, detail);
        let mut response = Self::default();
        (response.status_code, response.headers, response.body) = (status, headers, body);
        response
    }
}
