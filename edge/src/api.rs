//! The cash register's local HTTP JSON API.
//!
//! `POST /v1/charge` with `{"order_id", "amount_minor", "currency"}` answers a [`ChargeResult`].
//! Status codes: 200 for a decision (approved or declined; see `status` and `reason`), 400 for a
//! request that is not acceptable, 409 while another checkout runs, 503 when the store system is
//! unreachable. The body is always a `ChargeResult`.

use actix::Addr;
use actix_web::{http::StatusCode, web, HttpResponse};
use protocol::{ChargeRequest, ChargeResult, ChargeStatus, DeclineReason};

use crate::checkout::{Charge, CheckoutActor};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

pub(crate) fn configure(cfg: &mut web::ServiceConfig, checkout: Addr<CheckoutActor>) {
    cfg.app_data(web::Data::new(checkout))
        .app_data(
            web::JsonConfig::default()
                .limit(MAX_BODY_BYTES)
                .error_handler(|error, _| {
                    let body = refusal(
                        DeclineReason::InvalidRequest,
                        format!("request body: {error}"),
                    );
                    actix_web::error::InternalError::from_response(
                        error,
                        HttpResponse::BadRequest().json(body),
                    )
                    .into()
                }),
        )
        .route("/v1/charge", web::post().to(charge));
}

fn refusal(reason: DeclineReason, detail: String) -> ChargeResult {
    ChargeResult {
        order_id: String::new(),
        payment_id: None,
        status: ChargeStatus::Declined,
        reason: Some(reason),
        detail,
        account_id: None,
        already_paid: false,
    }
}

/// The HTTP status a charge result is sent with.
pub fn status_of(result: &ChargeResult) -> StatusCode {
    match result.reason {
        None => StatusCode::OK,
        Some(
            DeclineReason::InvalidRequest
            | DeclineReason::InvalidAmount
            | DeclineReason::UnknownCurrency,
        ) => StatusCode::BAD_REQUEST,
        Some(DeclineReason::TerminalBusy) => StatusCode::CONFLICT,
        Some(DeclineReason::StoreSystemUnreachable) => StatusCode::SERVICE_UNAVAILABLE,
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
