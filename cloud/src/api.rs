//! The cloud's admin HTTP JSON API: open accounts, read balances, transfers and ledger totals.

use actix::Addr;
use actix_web::{web, HttpResponse};
use protocol::OpenAccount;
use serde_json::json;

use crate::{
    actors::{BroadcastKeys, HubLinkActor, LedgerActor, LedgerAnswer, LedgerQuery, OpenAccountCmd},
    error::LedgerError,
};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub(crate) struct ApiState {
    pub ledger: Addr<LedgerActor>,
    pub link: Addr<HubLinkActor>,
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig, state: ApiState) {
    cfg.app_data(web::Data::new(state))
        .app_data(
            web::JsonConfig::default()
                .limit(MAX_BODY_BYTES)
                .error_handler(|error, _| {
                    let body = json!({ "error": "invalid_request", "detail": error.to_string() });
                    actix_web::error::InternalError::from_response(
                        error,
                        HttpResponse::BadRequest().json(body),
                    )
                    .into()
                }),
        )
        .route("/v1/accounts", web::post().to(open_account))
        .route("/v1/accounts", web::get().to(list_accounts))
        .route("/v1/accounts/{id}", web::get().to(get_account))
        .route("/v1/transfers", web::get().to(list_transfers))
        .route("/v1/ledger/totals", web::get().to(totals));
}

fn error_response(error: LedgerError) -> HttpResponse {
    let body = json!({ "error": match &error {
        LedgerError::Invalid(_) => "invalid_request",
        LedgerError::Conflict(_) => "conflict",
        LedgerError::Storage(_) => "storage",
    }, "detail": error.to_string() });
    match error {
        LedgerError::Invalid(_) => HttpResponse::BadRequest().json(body),
        LedgerError::Conflict(_) => HttpResponse::Conflict().json(body),
        LedgerError::Storage(_) => HttpResponse::ServiceUnavailable().json(body),
    }
}

fn unavailable(error: actix::MailboxError) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .json(json!({ "error": "unavailable", "detail": error.to_string() }))
}

async fn open_account(state: web::Data<ApiState>, body: web::Json<OpenAccount>) -> HttpResponse {
    let request = body.into_inner();
    let account_id = request.account_id.clone();
    match state.ledger.send(OpenAccountCmd(request)).await {
        Err(e) => unavailable(e),
        Ok(Err(e)) => error_response(e),
        Ok(Ok(key_change)) => {
            let created = key_change.is_some();
            if let Some(entry) = key_change {
                state.link.do_send(BroadcastKeys(vec![entry]));
            }
            match query(&state, LedgerQuery::Account(account_id)).await {
                Ok(LedgerAnswer::Account(Some(view))) if created => {
                    HttpResponse::Created().json(view)
                }
                Ok(LedgerAnswer::Account(Some(view))) => HttpResponse::Ok().json(view),
                Ok(_) => HttpResponse::InternalServerError().finish(),
                Err(response) => response,
            }
        }
    }
}

async fn query(state: &ApiState, q: LedgerQuery) -> Result<LedgerAnswer, HttpResponse> {
    match state.ledger.send(q).await {
        Err(e) => Err(unavailable(e)),
        Ok(Err(e)) => Err(error_response(e)),
        Ok(Ok(answer)) => Ok(answer),
    }
}

async fn get_account(state: web::Data<ApiState>, id: web::Path<String>) -> HttpResponse {
    match query(&state, LedgerQuery::Account(id.into_inner())).await {
        Ok(LedgerAnswer::Account(Some(view))) => HttpResponse::Ok().json(view),
        Ok(_) => HttpResponse::NotFound()
            .json(json!({ "error": "not_found", "detail": "no such account" })),
        Err(response) => response,
    }
}

async fn list_accounts(state: web::Data<ApiState>) -> HttpResponse {
    match query(&state, LedgerQuery::Accounts).await {
        Ok(LedgerAnswer::Accounts(all)) => HttpResponse::Ok().json(all),
        Ok(_) => HttpResponse::InternalServerError().finish(),
        Err(response) => response,
    }
}

async fn list_transfers(state: web::Data<ApiState>) -> HttpResponse {
    match query(&state, LedgerQuery::Transfers).await {
        Ok(LedgerAnswer::Transfers(all)) => HttpResponse::Ok().json(all),
        Ok(_) => HttpResponse::InternalServerError().finish(),
        Err(response) => response,
    }
}

async fn totals(state: web::Data<ApiState>) -> HttpResponse {
    match query(&state, LedgerQuery::Totals).await {
        Ok(LedgerAnswer::Totals(all)) => HttpResponse::Ok().json(all),
        Ok(_) => HttpResponse::InternalServerError().finish(),
        Err(response) => response,
    }
}
