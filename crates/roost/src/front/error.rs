//! Everything that can go wrong on the request path, who is to blame, and the one
//! function that maps it to a status and a page. Pages say what happened in general
//! terms and never leak paths, tracebacks or internal names; a refused request's page
//! says what was wrong with it, which its sender knows already.

use std::borrow::Cow;

use http::{header, HeaderValue, Response, StatusCode};

use super::body::ResponseBody;
use super::request_body::BodyReadError;
use crate::pool::CheckoutError;

#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// The client sent something invalid.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A method no WSGI application can serve (CONNECT: a tunnel).
    #[error("method {0} is not supported")]
    NotImplemented(&'static str),
    #[error("no site is served at host {0:?}")]
    UnknownHost(String),
    #[error("request body larger than the site's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the client sent no byte of its request body for {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error(transparent)]
    Checkout(#[from] CheckoutError),
    /// The worker died or closed its slot during the request.
    #[error("the worker closed the connection before answering")]
    WorkerGone,
    /// The worker sent something that is not the protocol (it has been killed).
    #[error("the worker broke the protocol: {0}")]
    Protocol(String),
    #[error("the request took longer than the site's request_timeout")]
    Timeout,
}

impl FrontError {
    pub fn status(&self) -> StatusCode {
        match self {
            FrontError::BadRequest(_) => StatusCode::BAD_REQUEST,
            FrontError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            FrontError::UnknownHost(_) => StatusCode::NOT_FOUND,
            FrontError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            FrontError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            FrontError::Checkout(CheckoutError::AppFailing { .. }) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            FrontError::Checkout(CheckoutError::Draining(_)) => StatusCode::NOT_FOUND,
            FrontError::Checkout(_) => StatusCode::SERVICE_UNAVAILABLE,
            FrontError::WorkerGone | FrontError::Protocol(_) => StatusCode::BAD_GATEWAY,
            FrontError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn explanation(&self) -> Cow<'static, str> {
        let general = match self {
            FrontError::BadRequest(why) => return format!("The request was refused: {why}.").into(),
            FrontError::NotImplemented(_) => "This server does not support the request's method.",
            FrontError::UnknownHost(_) | FrontError::Checkout(CheckoutError::Draining(_)) => {
                "No site is served at this address."
            }
            FrontError::BodyTooLarge { .. } => "The request body is larger than this site accepts.",
            FrontError::BodyTimeout(_) => "The request body was not sent in time.",
            FrontError::Checkout(CheckoutError::AppFailing { .. }) => {
                "The application failed to start. Its owner can find the reason in the site's error log."
            }
            FrontError::Checkout(_) => "The site is busy. Please try again shortly.",
            FrontError::WorkerGone | FrontError::Protocol(_) => {
                "The application did not answer correctly."
            }
            FrontError::Timeout => "The application took too long to answer.",
        };
        general.into()
    }

    /// The page sent to the client.
    pub fn response(&self) -> Response<ResponseBody> {
        let status = self.status();
        let body = format!(
            "{} {}\n\n{}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.explanation()
        );
        let mut response = Response::new(ResponseBody::full(body.into()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let FrontError::Checkout(
            CheckoutError::QueueFull { .. } | CheckoutError::QueueTimeout { .. },
        ) = self
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let FrontError::BadRequest(_)
        | FrontError::NotImplemented(_)
        | FrontError::BodyTooLarge { .. }
        | FrontError::BodyTimeout(_) = self
        {
            // The rest of the connection may hold an unread body: do not reuse it.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<BodyReadError> for FrontError {
    fn from(e: BodyReadError) -> Self {
        match e {
            BodyReadError::Idle(waited) => FrontError::BodyTimeout(waited),
            BodyReadError::Broken(_) => FrontError::BadRequest(crate::error_chain(&e)),
        }
    }
}
