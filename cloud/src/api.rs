//! The cloud's HTTPS JSON APIs: the admin API (open accounts, deposits, hub keys, read balances,
//! transfers, ledger totals, the audit trail), for operators' client certificates only, and the
//! enrollment API (customers, their faces, erasure), for the operator bearer token.

use actix::Addr;
use actix_web::{http::Method, web, HttpRequest, HttpResponse};
use protocol::{AccountKind, AddFace, CreateCustomer, Currency, Deposit, HubKey, OpenAccount};
use serde_json::json;

use crate::{
    customers::CustomerError,
    enroll::{
        AddTemplateCmd, CheckNewCustomer, CreateCustomerCmd, EnrollError, EraseCustomer,
        GetCustomer, IdentityActor,
    },
    error::LedgerError,
    hub_link::{BroadcastAllowances, BroadcastKeys, BroadcastTemplates, HubLinkActor},
    ledger::Ledger,
    ledger_actor::{
        CloseAccountCmd, DepositCmd, LedgerActor, OpenAccountCmd, ReadLedger, RecordAudit,
        SetHubKeyCmd,
    },
};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub(crate) struct ApiState {
    pub ledger: crate::bounded::Bounded<LedgerActor>,
    pub link: Addr<HubLinkActor>,
    /// The ledger for long reads (a store's statement), read on a blocking thread (on
    /// PostgreSQL with a connection of its own) so that payments never wait behind them, one at
    /// a time ([`ApiState::statements`]).
    pub apart: Ledger,
    /// One statement read at a time: more are answered 503 `busy` at once (each reads a
    /// store's transfers; a flood of them must not take the database's connections).
    pub statements: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Statements read at once ([`ApiState::statements`]).
pub const STATEMENTS_AT_ONCE: usize = 1;

/// JSON bodies up to `limit` bytes; an unreadable body is a 400 `invalid_request` naming the
/// problem.
fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(|error, _| {
            let body = json!({ "error": "invalid_request", "detail": error.to_string() });
            actix_web::error::InternalError::from_response(
                error,
                HttpResponse::BadRequest().json(body),
            )
            .into()
        })
}

/// Who may use the admin API, checked on every request before its body is read: TLS already
/// refused clients without a valid, unrevoked certificate of the fleet's CA; of those, only
/// operators pass, and a `viewer` only reads.
pub(crate) fn operator_gate(tls: std::sync::Arc<pki::TlsIdentity>) -> telemetry::Gate {
    std::sync::Arc::new(move |request: &actix_web::dev::ServiceRequest| {
        let peer = request
            .conn_data::<telemetry::Peer>()
            .and_then(|peer| peer.0.as_ref());
        // A connection kept open since before a revocation still carries the revoked
        // certificate: checked on every request against the list in force.
        let role = peer
            .filter(|identity| !tls.is_revoked(&identity.serial))
            .and_then(|identity| identity.role);
        let reads = matches!(*request.method(), Method::GET | Method::HEAD);
        let refusal = match role {
            Some(pki::Role::Operator) => return None,
            Some(pki::Role::Viewer) if reads => return None,
            Some(pki::Role::Viewer) => "the viewer role may only read",
            _ => "a valid operator certificate is required",
        };
        Some(HttpResponse::Forbidden().json(json!({ "error": "forbidden", "detail": refusal })))
    })
}

/// The common name of the operator certificate a request came with.
fn operator_of(request: &HttpRequest) -> String {
    request
        .conn_data::<telemetry::Peer>()
        .and_then(|peer| peer.0.as_ref())
        .map(|identity| identity.common_name.clone())
        .unwrap_or_else(|| "unknown".into())
}

/// Records a money-moving action with who did it and how it ended (`result`), then hands the
/// result on. The action has already happened: a failure to record it is logged and answered as
/// a storage error.
async fn audited<T>(
    ledger: &crate::bounded::Bounded<LedgerActor>,
    operator: String,
    action: &str,
    target: &str,
    detail: String,
    result: Result<T, HttpResponse>,
) -> Result<T, HttpResponse> {
    let entry = protocol::AuditEntry {
        at_ms: paycode::now_ms(),
        operator,
        action: action.into(),
        target: target.into(),
        detail,
        outcome: match &result {
            Ok(_) => "applied".into(),
            Err(refusal) => format!("refused: {}", refusal.status()),
        },
    };
    match ledger.send(RecordAudit(entry)).await {
        Ok(Ok(())) => result,
        Ok(Err(e)) => {
            tracing::error!(error = %e, action, target, "recording an operator action failed");
            Err(error_response(e))
        }
        Err(e) => Err(unavailable(e)),
    }
}

/// Opens an account (its opening balance moves money) and records who did it.
async fn open_audited(
    ledger: &crate::bounded::Bounded<LedgerActor>,
    operator: String,
    request: OpenAccount,
) -> Result<Option<protocol::KeyEntry>, HttpResponse> {
    let account_id = request.account_id.clone();
    let detail = format!(
        "kind={:?} currency={} initial_balance_minor={}",
        request.kind, request.currency, request.initial_balance_minor
    );
    let result = match ledger.send(OpenAccountCmd(request)).await {
        Err(e) => Err(unavailable(e)),
        Ok(Err(e)) => Err(error_response(e)),
        Ok(Ok(key_change)) => Ok(key_change),
    };
    audited(
        ledger,
        operator,
        "open_account",
        &account_id,
        detail,
        result,
    )
    .await
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig, state: ApiState) {
    cfg.app_data(web::Data::new(state))
        .app_data(json_config(MAX_BODY_BYTES))
        .app_data(web::QueryConfig::default().error_handler(|error, _| {
            let body = json!({ "error": "invalid_request", "detail": error.to_string() });
            actix_web::error::InternalError::from_response(
                error,
                HttpResponse::BadRequest().json(body),
            )
            .into()
        }))
        .route("/v1/accounts", web::post().to(open_account))
        .route("/v1/accounts", listing(Ledger::accounts))
        .route("/v1/accounts/{id}", web::get().to(get_account))
        .route("/v1/accounts/{id}/deposits", web::post().to(deposit))
        .route("/v1/stores/{id}/hub-key", web::put().to(set_hub_key))
        .route("/v1/debts", listing(Ledger::debts))
        .route("/v1/reconciliation/conflicts", listing(Ledger::conflicts))
        .route(
            "/v1/reconciliation/code-reuse",
            listing(Ledger::code_reuses),
        )
        .route("/v1/reconciliation/late-posts", listing(Ledger::late_posts))
        .route("/v1/stores/{id}/settlement", web::get().to(settlement))
        .route("/v1/transfers", listing(Ledger::transfers))
        .route("/v1/ledger/totals", listing(Ledger::totals))
        .route("/v1/audit", listing(Ledger::audit_trail));
}

/// A GET route answering one read of the ledger with its JSON.
fn listing<T>(read: fn(&Ledger) -> Result<T, LedgerError>) -> actix_web::Route
where
    T: serde::Serialize + Send + 'static,
{
    web::get().to(move |state: web::Data<ApiState>| async move {
        match query(&state, read).await {
            Ok(answer) => HttpResponse::Ok().json(answer),
            Err(response) => response,
        }
    })
}

/// Sends a command to the ledger thread; its error as the HTTP answer.
async fn command<M>(state: &ApiState, cmd: M) -> Result<M::Result, HttpResponse>
where
    M: actix::Message + Send + 'static,
    M::Result: Send,
    LedgerActor: actix::Handler<M>,
{
    state.ledger.send(cmd).await.map_err(unavailable)
}

async fn deposit(
    http: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<String>,
    body: web::Json<Deposit>,
) -> HttpResponse {
    let account_id = id.into_inner();
    let deposit = body.into_inner();
    let detail = format!(
        "deposit_id={} amount_minor={}",
        deposit.deposit_id, deposit.amount_minor
    );
    let cmd = DepositCmd {
        account_id: account_id.clone(),
        deposit,
    };
    let result = match command(&state, cmd).await {
        Ok(answer) => answer.map_err(error_response),
        Err(response) => Err(response),
    };
    let result = audited(
        &state.ledger,
        operator_of(&http),
        "deposit",
        &account_id,
        detail,
        result,
    )
    .await;
    match result {
        Ok(view) => HttpResponse::Ok().json(view),
        Err(response) => response,
    }
}

async fn set_hub_key(
    http: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<String>,
    body: web::Json<HubKey>,
) -> HttpResponse {
    let store_id = id.into_inner();
    let cmd = SetHubKeyCmd {
        store_id: store_id.clone(),
        public_key: body.public_key.clone(),
    };
    let result = match command(&state, cmd).await {
        Ok(answer) => answer.map_err(error_response),
        Err(response) => Err(response),
    };
    let result = audited(
        &state.ledger,
        operator_of(&http),
        "set_hub_key",
        &store_id,
        format!("public_key={}", body.public_key),
        result,
    )
    .await;
    match result {
        Ok(_) => {
            HttpResponse::Ok().json(json!({ "store_id": store_id, "hub_key": body.public_key }))
        }
        Err(response) => response,
    }
}

fn error_response(error: LedgerError) -> HttpResponse {
    let body = json!({ "error": match &error {
        LedgerError::Invalid(_) => "invalid_request",
        LedgerError::Conflict(_) => "conflict",
        LedgerError::Storage(_) => "storage",
        LedgerError::Unavailable(_) | LedgerError::Fenced(_) => "unavailable",
        LedgerError::Broken(_) => "books_broken",
    }, "detail": error.to_string() });
    match error {
        LedgerError::Invalid(_) => HttpResponse::BadRequest().json(body),
        LedgerError::Conflict(_) => HttpResponse::Conflict().json(body),
        LedgerError::Storage(_) | LedgerError::Unavailable(_) | LedgerError::Fenced(_) => {
            HttpResponse::ServiceUnavailable().json(body)
        }
        LedgerError::Broken(_) => HttpResponse::InternalServerError().json(body),
    }
}

fn unavailable(error: actix::MailboxError) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .json(json!({ "error": "unavailable", "detail": error.to_string() }))
}

async fn open_account(
    http: HttpRequest,
    state: web::Data<ApiState>,
    body: web::Json<OpenAccount>,
) -> HttpResponse {
    let request = body.into_inner();
    let account_id = request.account_id.clone();
    let result = open_audited(&state.ledger, operator_of(&http), request).await;
    match result {
        Err(response) => response,
        Ok(key_change) => {
            let created = key_change.is_some();
            if let Some(entry) = key_change {
                state.link.do_send(BroadcastKeys(vec![entry]));
            }
            match query(&state, move |l| l.account(&account_id)).await {
                Ok(Some(view)) if created => HttpResponse::Created().json(view),
                Ok(Some(view)) => HttpResponse::Ok().json(view),
                Ok(None) => HttpResponse::InternalServerError().finish(),
                Err(response) => response,
            }
        }
    }
}

/// Reads the ledger on its thread.
async fn query<T: Send + 'static>(
    state: &ApiState,
    read: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, HttpResponse> {
    command(state, ReadLedger::new(read))
        .await?
        .map_err(error_response)
}

/// `GET /v1/stores/{id}/settlement` parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SettlementQuery {
    /// The day, `YYYY-MM-DD`.
    date: String,
    /// The store's offset from UTC, minutes; default 0.
    #[serde(default)]
    utc_offset_minutes: i32,
    /// `json` (default) or `csv`.
    #[serde(default)]
    format: Option<String>,
}

/// The store's statement for a day, as JSON or CSV.
async fn settlement(
    state: web::Data<ApiState>,
    id: web::Path<String>,
    query_string: web::Query<SettlementQuery>,
) -> HttpResponse {
    let store_id = id.into_inner();
    let SettlementQuery {
        date,
        utc_offset_minutes,
        format,
    } = query_string.into_inner();
    let csv = match format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return HttpResponse::BadRequest().json(json!({
                "error": "invalid_request",
                "detail": format!("format {other:?}: json or csv"),
            }))
        }
    };
    let Ok(_slot) = state.statements.clone().try_acquire_owned() else {
        return HttpResponse::ServiceUnavailable().json(json!({
            "error": "busy",
            "detail": "another statement is being read; try again in a moment",
        }));
    };
    let ledger = state.apart.clone();
    let answer =
        match web::block(move || ledger.settlement(&store_id, &date, utc_offset_minutes)).await {
            Ok(answer) => answer.map_err(error_response),
            Err(e) => Err(HttpResponse::ServiceUnavailable()
                .json(json!({ "error": "unavailable", "detail": e.to_string() }))),
        };
    match answer {
        Ok(statement) if csv => HttpResponse::Ok()
            .content_type("text/csv; charset=utf-8")
            .insert_header((
                "Content-Disposition",
                format!(
                    "attachment; filename=\"settlement-{}-{}.csv\"",
                    statement.store_id, statement.date
                ),
            ))
            .body(statement.to_csv()),
        Ok(statement) => HttpResponse::Ok().json(statement),
        Err(response) => response,
    }
}

async fn get_account(state: web::Data<ApiState>, id: web::Path<String>) -> HttpResponse {
    let id = id.into_inner();
    match query(&state, move |l| l.account(&id)).await {
        Ok(Some(view)) => HttpResponse::Ok().json(view),
        Ok(None) => HttpResponse::NotFound()
            .json(json!({ "error": "not_found", "detail": "no such account" })),
        Err(response) => response,
    }
}

// ---------------------------------------------------------------------------------------------
// Enrollment API (served over HTTPS only)
// ---------------------------------------------------------------------------------------------

/// Largest enrollment request (a base64 photo).
pub const MAX_ENROLL_BODY_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone)]
pub(crate) struct EnrollState {
    pub ledger: crate::bounded::Bounded<LedgerActor>,
    pub link: Addr<HubLinkActor>,
    pub identity: crate::bounded::Bounded<IdentityActor>,
    pub faces: Addr<face::worker::FaceWorker>,
}

pub(crate) fn configure_enroll(cfg: &mut web::ServiceConfig, state: EnrollState) {
    cfg.app_data(web::Data::new(state))
        .app_data(json_config(MAX_ENROLL_BODY_BYTES))
        .route("/v1/customers", web::post().to(create_customer))
        .route("/v1/customers/{id}", web::get().to(get_customer))
        .route("/v1/customers/{id}", web::delete().to(erase_customer))
        .route("/v1/customers/{id}/faces", web::post().to(add_face));
}

/// The enrollment API serves operators only, checked before the body (a photo of up to 16 MiB)
/// is read: an operator's client certificate with its role (opening balances move money: a
/// viewer only reads), and `Authorization: Bearer <token>`.
pub(crate) fn enroll_gate(
    tls: std::sync::Arc<pki::TlsIdentity>,
    digest: [u8; 32],
) -> telemetry::Gate {
    let operator = operator_gate(tls);
    let token = telemetry::bearer_gate(digest, || {
        HttpResponse::Unauthorized()
            .insert_header(("WWW-Authenticate", "Bearer"))
            .json(json!({ "error": "unauthorized", "detail": "a valid operator bearer token is required" }))
    });
    std::sync::Arc::new(move |request: &actix_web::dev::ServiceRequest| {
        operator(request).or_else(|| token(request))
    })
}

fn enroll_error(error: EnrollError) -> HttpResponse {
    let (status, code) = match &error {
        EnrollError::Customer(CustomerError::Invalid(_)) => {
            (actix_web::http::StatusCode::BAD_REQUEST, "invalid_request")
        }
        EnrollError::Customer(CustomerError::NotFound(_)) => {
            (actix_web::http::StatusCode::NOT_FOUND, "not_found")
        }
        EnrollError::Customer(CustomerError::Conflict(d))
            if d.starts_with("probable duplicate") =>
        {
            (actix_web::http::StatusCode::CONFLICT, "probable_duplicate")
        }
        EnrollError::Customer(CustomerError::Conflict(_)) => {
            (actix_web::http::StatusCode::CONFLICT, "conflict")
        }
        EnrollError::Customer(CustomerError::Storage(_)) | EnrollError::Index(_) => {
            tracing::error!(%error, "enrollment failed");
            (actix_web::http::StatusCode::SERVICE_UNAVAILABLE, "storage")
        }
    };
    HttpResponse::build(status).json(json!({ "error": code, "detail": error.to_string() }))
}

async fn create_customer(
    http: HttpRequest,
    state: web::Data<EnrollState>,
    body: web::Json<CreateCustomer>,
) -> HttpResponse {
    let request = body.into_inner();
    if let Err(e) = crate::customers::validate_customer(&request) {
        return enroll_error(e.into());
    }
    let currency = match Currency::parse(&request.currency) {
        Ok(c) => c,
        Err(e) => {
            return HttpResponse::BadRequest()
                .json(json!({ "error": "invalid_request", "detail": e.to_string() }))
        }
    };
    match state
        .identity
        .send(CheckNewCustomer(request.customer_id.clone()))
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return enroll_error(e),
        Err(e) => return unavailable(e),
    }
    // The ledger account first (opening it again with the same fields is a no-op, so a retry after
    // a failure below completes the enrollment), then the profile.
    let open = OpenAccount {
        account_id: request.customer_id.as_str().into(),
        kind: AccountKind::Customer,
        currency,
        initial_balance_minor: request.initial_balance_minor,
        public_key: request.public_key.clone(),
    };
    let result = open_audited(&state.ledger, operator_of(&http), open).await;
    match result {
        Err(response) => return response,
        Ok(Some(entry)) => state.link.do_send(BroadcastKeys(vec![entry])),
        Ok(None) => {}
    }
    match state.identity.send(CreateCustomerCmd(request)).await {
        Err(e) => unavailable(e),
        Ok(Err(e)) => enroll_error(e),
        Ok(Ok(view)) => HttpResponse::Created().json(view),
    }
}

async fn get_customer(state: web::Data<EnrollState>, id: web::Path<String>) -> HttpResponse {
    match state.identity.send(GetCustomer(id.into_inner())).await {
        Err(e) => unavailable(e),
        Ok(Err(e)) => enroll_error(e),
        Ok(Ok(Some(view))) => HttpResponse::Ok().json(view),
        Ok(Ok(None)) => HttpResponse::NotFound()
            .json(json!({ "error": "not_found", "detail": "no such customer" })),
    }
}

async fn add_face(
    state: web::Data<EnrollState>,
    id: web::Path<String>,
    body: web::Json<AddFace>,
) -> HttpResponse {
    use base64::Engine as _;
    let customer_id = id.into_inner();
    let request = body.into_inner();
    let image = match base64::engine::general_purpose::STANDARD.decode(request.image_base64.trim())
    {
        Ok(bytes) => bytes,
        Err(e) => {
            return HttpResponse::BadRequest().json(
                json!({ "error": "invalid_request", "detail": format!("image_base64: {e}") }),
            )
        }
    };
    match state.identity.send(GetCustomer(customer_id.clone())).await {
        Ok(Ok(Some(_))) => {}
        Ok(Ok(None)) => {
            return HttpResponse::NotFound()
                .json(json!({ "error": "not_found", "detail": "no such customer" }))
        }
        Ok(Err(e)) => return enroll_error(e),
        Err(e) => return unavailable(e),
    }
    let analysis = match state
        .faces
        .send(face::worker::AnalyzeFace {
            image,
            gates: face::Gates::All,
        })
        .await
    {
        Err(e) => return unavailable(e),
        Ok(Err(e @ face::FaceError::Model(_))) => {
            tracing::error!(error = %e, "face pipeline failed");
            return HttpResponse::ServiceUnavailable()
                .json(json!({ "error": "unavailable", "detail": e.to_string() }));
        }
        Ok(Err(e)) => {
            return HttpResponse::BadRequest()
                .json(json!({ "error": "invalid_image", "detail": e.to_string() }))
        }
        Ok(Ok(analysis)) => analysis,
    };
    let (Some(embedding), None) = (analysis.embedding.clone(), analysis.refusal) else {
        let reason = analysis.refusal.map(|r| r.as_str()).unwrap_or("no_face");
        return HttpResponse::UnprocessableEntity().json(json!({
            "error": "face_refused",
            "reason": reason,
            "detail": format!("the photo was refused: {reason}"),
        }));
    };
    let liveness = analysis.liveness.map(|l| l.fused).unwrap_or(0.0);
    let command = AddTemplateCmd {
        customer_id,
        embedding,
        liveness,
        look_alikes: request.confirmed_look_alike_of,
    };
    match state.identity.send(command).await {
        Err(e) => unavailable(e),
        Ok(Err(e)) => enroll_error(e),
        Ok(Ok((added, update))) => {
            state.link.do_send(BroadcastTemplates(update));
            HttpResponse::Created().json(added)
        }
    }
}

async fn erase_customer(state: web::Data<EnrollState>, id: web::Path<String>) -> HttpResponse {
    let customer_id = id.into_inner();
    let (removed, update) = match state
        .identity
        .send(EraseCustomer(customer_id.clone()))
        .await
    {
        Err(e) => return unavailable(e),
        Ok(Err(e)) => return enroll_error(e),
        Ok(Ok(done)) => done,
    };
    state.link.do_send(BroadcastTemplates(update));
    match state
        .ledger
        .send(CloseAccountCmd(customer_id.clone()))
        .await
    {
        Ok(Ok((key_change, allowance))) => {
            if let Some(entry) = key_change {
                state.link.do_send(BroadcastKeys(vec![entry]));
            }
            if let Some(revoked) = allowance {
                state.link.do_send(BroadcastAllowances(vec![revoked]));
            }
        }
        // The templates are gone and the hubs told; the account stays open until a retry.
        Ok(Err(e)) => return error_response(e),
        Err(e) => return unavailable(e),
    }
    HttpResponse::Ok().json(json!({
        "customer_id": customer_id,
        "erased": true,
        "templates_removed": removed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The admin API lists the confirmations that came too late (here, one for a payment the
    /// ledger never saw), read from the ledger thread as their own type.
    #[actix::test]
    async fn late_posts_are_listed_for_the_operator() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger")).unwrap();
        let posted = ledger
            .post(
                "store-1",
                &protocol::PostPayment {
                    payment_id: "store-1:o-1".into(),
                    account_id: "alice".into(),
                    code_nonce: "n-1".into(),
                },
            )
            .unwrap();
        assert!(
            !posted,
            "a post of an unknown payment is kept as late, not applied"
        );
        let apart_ledger = ledger.clone();
        let ledger = crate::bounded::Bounded::new(
            actix::SyncArbiter::start(1, {
                let payer = crate::payer::for_tests(dir.path());
                move || LedgerActor::new(ledger.clone(), payer.clone())
            }),
            4,
        );
        let pki_dir = dir.path().join("pki");
        let authority = pki::Pki::init(&pki_dir).unwrap();
        authority
            .issue(&pki::Identity::cloud(), &pki::IssueOptions::default())
            .unwrap();
        let files = pki::TlsConfig {
            pki_dir,
            ..pki::TlsConfig::default()
        }
        .files("cloud");
        let signer = pki::TlsIdentity::load(&files)
            .unwrap()
            .reply_signer()
            .unwrap();
        let (inner, _eventloop) =
            rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("test", "127.0.0.1", 1), 4);
        let client = mqtt::Client::new(inner, std::sync::Arc::new(signer));
        let store = crate::customers::CustomerStore::open(
            &dir.path().join("customers"),
            &dir.path().join("template.key"),
        )
        .unwrap();
        let identity = IdentityActor::open(
            store,
            dir.path().join("identity.faiss"),
            crate::enroll::IdentityConfig::default(),
            prometheus::IntGauge::new("t", "t").unwrap(),
        )
        .unwrap();
        let searcher = identity.searcher();
        let searchers = actix::SyncArbiter::start(1, move || searcher.clone());
        let slot = std::sync::Mutex::new(Some(identity));
        let identity = actix::SyncArbiter::start(1, move || slot.lock().unwrap().take().unwrap());
        let link = actix::Actor::start(HubLinkActor::new(
            client,
            ledger.clone(),
            crate::bounded::Bounded::new(identity, 1),
            crate::bounded::Bounded::new(searchers, 1),
            telemetry::PaymentMetrics::register(
                &prometheus::Registry::new(),
                "cloud",
                &[telemetry::DecisionPath::Online],
            ),
            prometheus::IntGauge::new("c", "c").unwrap(),
        ));
        let state = ApiState {
            ledger,
            link,
            apart: apart_ledger,
            statements: std::sync::Arc::new(tokio::sync::Semaphore::new(STATEMENTS_AT_ONCE)),
        };
        let app = actix_web::test::init_service(
            actix_web::App::new().configure(move |cfg| configure(cfg, state.clone())),
        )
        .await;
        let request = actix_web::test::TestRequest::get()
            .uri("/v1/reconciliation/late-posts")
            .to_request();
        let late: Vec<crate::ledger::LatePost> =
            actix_web::test::call_and_read_body_json(&app, request).await;
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].store_id, "store-1");
        assert_eq!(late[0].post.payment_id, "store-1:o-1");
    }
}
