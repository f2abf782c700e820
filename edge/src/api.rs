//! The cash register's local HTTP JSON API.
//!
//! - `POST /v1/charge` with `{"order_id", "amount_minor", "currency"}` (and optionally a `token`
//!   from a verification) answers a [`ChargeResult`]; without a token the scanner waits for the
//!   customer's payment code.
//! - `POST /v1/verify` with `{"method": "face" | "code_and_face"}` looks at the customer and
//!   answers a [`VerifyReply`]: a payment token, a second-factor challenge, or a refusal.
//! - `POST /v1/verify/second-factor` with `{"challenge_id", "value"}` answers the challenge.
//! - `POST /v1/refund` with `{"refund_id", "order_id", "amount_minor", "currency"}` answers a
//!   [`RefundResult`]: refunded, declined, or unknown (send the same refund id again).
//!
//! Status codes: 200 for a decision (see `status` and `reason`), 400 for a request that is not
//! acceptable, 409 while another session uses the terminal's sensors (or, for a refund, while the
//! payment is not final or not reconciled yet), 503 when the store system is unreachable.

use actix::Addr;
use actix_web::{http::StatusCode, web, HttpResponse};
use protocol::{
    ChargeRequest, ChargeResult, DeclineReason, RefundRequest, RefundResult, SecondFactorAnswer,
    VerifyReply, VerifyStart,
};

use crate::{
    checkout::{AnswerSecondFactor, Charge, CheckoutActor, VerifyCustomer},
    refund::RefundDesk,
};

/// Refuses, before its body is read, a request without `Authorization: Bearer <token>` for the
/// token whose SHA-256 is `digest`.
pub(crate) fn bearer_gate(digest: [u8; 32]) -> telemetry::Gate {
    telemetry::bearer_gate(digest, || {
        HttpResponse::Unauthorized()
            .insert_header(("WWW-Authenticate", "Bearer"))
            .json(refusal(
                DeclineReason::InvalidRequest,
                "a valid register token is required".into(),
            ))
    })
}

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

pub(crate) fn configure(
    cfg: &mut web::ServiceConfig,
    checkout: Addr<CheckoutActor>,
    refunds: RefundDesk,
) {
    cfg.app_data(web::Data::new(checkout))
        .app_data(web::Data::new(refunds))
        .service(
            web::resource("/v1/refund")
                .app_data(json_body(|detail| {
                    RefundResult::declined("", "", DeclineReason::InvalidRequest, detail)
                }))
                .route(web::post().to(refund)),
        )
        .service(
            web::resource("/v1/charge")
                .app_data(json_body(|detail| {
                    refusal(DeclineReason::InvalidRequest, detail)
                }))
                .route(web::post().to(charge)),
        )
        .service(
            web::resource("/v1/verify")
                .app_data(json_body(|detail| {
                    VerifyReply::refused(DeclineReason::InvalidRequest, detail)
                }))
                .route(web::post().to(verify)),
        )
        .service(
            web::resource("/v1/verify/second-factor")
                .app_data(json_body(|detail| {
                    VerifyReply::refused(DeclineReason::InvalidRequest, detail)
                }))
                .route(web::post().to(second_factor)),
        );
}

/// Reads JSON bodies up to [`MAX_BODY_BYTES`]; an unreadable one is answered 400 in the shape of
/// the route's normal answer, built by `refuse` from what was wrong.
fn json_body<T: serde::Serialize + 'static>(refuse: fn(String) -> T) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(MAX_BODY_BYTES)
        .error_handler(move |error, _| {
            let body = refuse(format!("request body: {error}"));
            actix_web::error::InternalError::from_response(
                error,
                HttpResponse::BadRequest().json(body),
            )
            .into()
        })
}

fn refusal(reason: DeclineReason, detail: String) -> ChargeResult {
    ChargeResult::declined("", reason, detail)
}

/// The HTTP status a charge result is sent with.
pub fn status_of(result: &ChargeResult) -> StatusCode {
    status_of_reason(result.reason)
}

/// The HTTP status of a verification outcome.
pub fn status_of_verify(reply: &VerifyReply) -> StatusCode {
    match reply {
        VerifyReply::Refused { reason, .. } => status_of_reason(Some(*reason)),
        _ => StatusCode::OK,
    }
}

/// The HTTP status of a refund's outcome.
pub fn status_of_refund(result: &RefundResult) -> StatusCode {
    match result.reason {
        Some(DeclineReason::PaymentNotSettled | DeclineReason::PaymentNotReconciled) => {
            StatusCode::CONFLICT
        }
        reason => status_of_reason(reason),
    }
}

fn status_of_reason(reason: Option<DeclineReason>) -> StatusCode {
    match reason {
        None => StatusCode::OK,
        Some(
            DeclineReason::InvalidRequest
            | DeclineReason::InvalidAmount
            | DeclineReason::UnknownCurrency
            | DeclineReason::UnsupportedVersion,
        ) => StatusCode::BAD_REQUEST,
        Some(DeclineReason::TerminalBusy | DeclineReason::PaymentInProgress) => {
            StatusCode::CONFLICT
        }
        Some(
            DeclineReason::StoreSystemUnreachable
            | DeclineReason::OutcomeUnknown
            | DeclineReason::HubBusy,
        ) => StatusCode::SERVICE_UNAVAILABLE,
        Some(DeclineReason::RateLimited) => StatusCode::TOO_MANY_REQUESTS,
        Some(_) => StatusCode::OK,
    }
}

async fn charge(
    checkout: web::Data<Addr<CheckoutActor>>,
    body: web::Json<ChargeRequest>,
) -> HttpResponse {
    let request = body.into_inner();
    let order_id = request.order_id.clone();
    let result = match checkout.send(Charge(request)).await {
        Ok(result) => result,
        Err(error) => ChargeResult {
            order_id,
            ..refusal(
                DeclineReason::Internal,
                format!("checkout unavailable: {error}"),
            )
        },
    };
    HttpResponse::build(status_of(&result)).json(result)
}

async fn refund(refunds: web::Data<RefundDesk>, body: web::Json<RefundRequest>) -> HttpResponse {
    let result = refunds.refund(body.into_inner()).await;
    HttpResponse::build(status_of_refund(&result)).json(result)
}

async fn verify(
    checkout: web::Data<Addr<CheckoutActor>>,
    body: web::Json<VerifyStart>,
) -> HttpResponse {
    let reply = checkout
        .send(VerifyCustomer(body.into_inner()))
        .await
        .unwrap_or_else(|error| {
            VerifyReply::refused(
                DeclineReason::Internal,
                format!("checkout unavailable: {error}"),
            )
        });
    HttpResponse::build(status_of_verify(&reply)).json(reply)
}

async fn second_factor(
    checkout: web::Data<Addr<CheckoutActor>>,
    body: web::Json<SecondFactorAnswer>,
) -> HttpResponse {
    let reply = checkout
        .send(AnswerSecondFactor(body.into_inner()))
        .await
        .unwrap_or_else(|error| {
            VerifyReply::refused(
                DeclineReason::Internal,
                format!("checkout unavailable: {error}"),
            )
        });
    HttpResponse::build(status_of_verify(&reply)).json(reply)
}
