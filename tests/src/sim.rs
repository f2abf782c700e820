//! A deterministic simulation of one store's hub, the cloud's ledger and the network between
//! them (TigerBeetle's VOPR is the model): the hub's attempt state machine
//! ([`hub::attempt`]), its real journal, offline book and signer, and the cloud's real ledger,
//! driven by one seeded scheduler with a simulated clock. The network loses, duplicates, delays
//! (so reorders) and misroutes messages; the link is cut and healed; the cloud fails after
//! applying; the hub crashes and restarts with its disk or without it; its clock steps backwards
//! and forwards; cashiers retry orders whose outcome they did not hear, with the same amount or
//! another, with the same code or a fresh one. After every run the faults heal, the hub drains,
//! and the history is checked against the ledger.
//!
//! Everything that happens is decided by the seed: a failing seed prints and replays exactly
//! (`facepay-sim --seed N`). The journal and the ledger are their real code over the in-memory
//! store of `storage::kv` (sled's API and semantics, without its log writer threads).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::bail;
use cloud::ledger::{Ledger, OfflinePolicy};
use hub::{
    attempt::{Attempt, CloudResult, Effect, Event, Outcome, Payer},
    book::OfflineBook,
    journal::{Journal, JournalEntry},
};
use paycode::hubsig::HubSigner;
use protocol::{
    synthetic::Rng, AccountId, AccountKind, AuthorizeRequest, CloudAuthorize, CodeNonce, Currency,
    Decision, DeclineReason, OfflinePayment, OpenAccount, PaymentId, PaymentProof, PaymentStatus,
    ReconcileResult, VoidPayment,
};
use storage::kv::MemoryDb;

const STORE: &str = "store-1";
const TERMINALS: usize = 3;
const CUSTOMERS: usize = 3;
const OPENING_BALANCE: i64 = 20_000;
/// Simulated time a run lasts, ms.
const RUN_MS: u64 = 20_000;
/// The hub's deadline for the cloud, ms.
const CLOUD_TIMEOUT_MS: u64 = 300;
/// How often the hub drains voids and its backlog, ms.
const DRAIN_INTERVAL_MS: u64 = 200;
/// How long a payment stays pending at the cloud without its post, ms.
const PENDING_TTL_MS: u64 = 60_000;
/// How often the cloud expires pending payments, ms.
const EXPIRY_INTERVAL_MS: u64 = 1_000;
/// A code's validity window and the clock-skew tolerance, ms (the hub's defaults).
const CODE_WINDOW_MS: u64 = 60_000;
const CLOCK_SKEW_MS: u64 = 5_000;

/// What a run did, for the report.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Attempts the cashiers made.
    pub attempts: usize,
    /// Heard approved (of which offline).
    pub approved: usize,
    /// Heard approved offline.
    pub approved_offline: usize,
    /// Heard declined.
    pub declined: usize,
    /// Heard nothing (the hub crashed while deciding).
    pub unknown: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Offline approvals lost with a wiped hub disk (the stated cost of losing the disk: the
    /// store was told "approved" and the money never reaches it).
    pub lost_with_disk: usize,
    /// Online approvals whose post was lost with a wiped hub disk: the cloud moved them back
    /// when they expired; the register heard "approved" and the store does not get the money.
    pub reversed_after_approval_with_disk_lost: usize,
    /// Orders charged at the cloud, forgotten with a wiped hub disk, charged again with other
    /// details and approved offline, and that approval lost with the disk too: the ledger holds
    /// the first charge, and the register's approval never reaches the cloud.
    pub lost_with_disk_after_another_charge: usize,
    /// Orders the hub approved, then forgot with its wiped disk, whose later charge heard a
    /// decline (an offline decline after an unanswered attempt, a voided code): the cloud had
    /// them paid and the hub could not know. Never a decline of a code for its age or window:
    /// those ask the cloud.
    pub declined_after_approval_with_disk_lost: usize,
    /// Offline approvals in conflict with a pending attempt whose void was lost with a wiped
    /// disk: kept for the operator; the store does not get the money until one settles it.
    pub conflicts_with_disk_lost: usize,
    /// Requests a terminal sent again, unanswered (the hub died, or its answer was lost).
    pub resent: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Heard {
    Approved { offline: bool },
    Declined(DeclineReason),
    Unknown,
}

#[derive(Debug, Clone)]
struct Op {
    order: String,
    account: usize,
    amount_minor: i64,
    heard: Heard,
    /// A copy of the terminal's request (sent while the first was in flight): the terminal's
    /// register heard the first.
    copy: bool,
}

#[derive(Debug, Clone)]
enum ToCloud {
    Authorize(CloudAuthorize),
    Void(VoidPayment),
    Post(Vec<VoidPayment>),
    Reconcile(Vec<OfflinePayment>),
    Status(PaymentId),
}

#[derive(Debug, Clone)]
enum ToHub {
    Authorized {
        payment_id: PaymentId,
        decision: Decision,
        allowance: Option<protocol::Allowance>,
    },
    Failed,
    Voided {
        payment_id: PaymentId,
    },
    Posted {
        payment_ids: Vec<PaymentId>,
    },
    Reconciled(Vec<ReconcileResult>),
    Allowances(Vec<protocol::Allowance>),
    Status {
        payment_id: PaymentId,
        status: PaymentStatus,
    },
}

#[derive(Debug, Clone)]
enum Happening {
    /// A terminal starts its next charge.
    Charge(usize),
    /// An attempt's next effect runs.
    Step(u64),
    /// A request's deadline passes.
    Deadline(u64),
    /// A message reaches the cloud.
    AtCloud(u64, ToCloud),
    /// A message reaches the hub (in the hub's incarnation `epoch`).
    AtHub(u64, u64, ToHub),
    /// The hub drains voids and its backlog.
    Drain,
    /// The hub prunes old nonces.
    Prune,
    /// The cloud expires pending payments.
    Expire,
    /// A fault begins.
    Fault(Fault),
    /// A cut heals.
    Heal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Cut,
    CrashHub,
    WipeHub,
    ClockBack,
    ClockForward,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Cut => "cut",
            Fault::CrashHub => "crash_hub",
            Fault::WipeHub => "wipe_hub",
            Fault::ClockBack => "clock_back",
            Fault::ClockForward => "clock_forward",
        }
    }
}

/// One attempt in flight at the hub.
struct InFlight {
    terminal: usize,
    /// A second request for the same charge sent while the first is in flight (a terminal's
    /// retry after its own deadline, or a rogue terminal): it does not free the terminal.
    duplicate: bool,
    op: usize,
    request: AuthorizeRequest,
    payer: Payer,
    machine: Attempt,
    effect: Effect,
    /// It reached the payment actor, which decides one payment at a time.
    admitted: bool,
}

/// What a sent request waits for.
enum Waiting {
    Attempt(u64),
    Status(u64),
    Void(VoidPayment),
    Post(Vec<VoidPayment>),
    Batch,
}

struct Hub {
    /// The hub's disk: a restart reopens its journal on it; a wipe replaces it.
    disk: MemoryDb,
    journal: Journal,
    book: OfflineBook,
    signer: HubSigner,
    /// The hub's clock offset from the simulated time, ms (clock jumps).
    clock_offset_ms: i64,
    epoch: u64,
    attempts: BTreeMap<u64, InFlight>,
    waiting: HashMap<u64, Waiting>,
    draining: bool,
}

/// A code as the customer's phone shows it: its nonce and when it was issued.
type Code = (CodeNonce, u64);

struct Terminal {
    last: Option<(String, usize, i64, Code)>,
    busy: bool,
}

struct Sim {
    rng: Rng,
    now_ms: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Happening>,
    ledger: Ledger,
    /// The cloud's clock: the simulated time.
    cloud_clock: std::sync::Arc<clock::ManualClock>,
    hub: Hub,
    cut: bool,
    terminals: Vec<Terminal>,
    ops: Vec<Op>,
    next_id: u64,
    report: SimReport,
    /// Offline approvals the hub approved and still held when its disk was wiped.
    lost: BTreeSet<PaymentId>,
    /// Payments whose void (or undecided attempt) was lost with a wiped disk.
    lost_voids: BTreeSet<PaymentId>,
    /// Payments the hub had approved when its disk was wiped.
    forgotten: BTreeSet<PaymentId>,
    faults_on: bool,
}

fn eur() -> Currency {
    Currency::parse("EUR").expect("EUR")
}

fn account(n: usize) -> AccountId {
    format!("cust-{n}").into()
}

fn offline_config() -> hub::config::OfflineConfig {
    hub::config::OfflineConfig {
        payment_ceiling_minor: 1_500,
        store_ceiling_minor: 6_000,
        ..Default::default()
    }
}

impl Sim {
    fn new(seed: u64) -> anyhow::Result<Self> {
        let cloud_clock = clock::ManualClock::new(1_000_000);
        let ledger = Ledger::in_memory()?
            .with_offline_policy(OfflinePolicy {
                store_allowance_minor: 3_000,
                account_cap_minor: 3_000,
            })
            .with_pending_ttl(PENDING_TTL_MS)
            .with_clock(cloud_clock.clone());
        let open = |id: AccountId, kind, balance| {
            ledger.open_account(&OpenAccount {
                account_id: id,
                kind,
                currency: eur(),
                initial_balance_minor: balance,
                public_key: None,
            })
        };
        open(STORE.into(), AccountKind::Merchant, 0)?;
        for n in 0..CUSTOMERS {
            open(account(n), AccountKind::Customer, OPENING_BALANCE)?;
        }
        let signer = HubSigner::from_seed(&[7; 32]);
        ledger.set_hub_key(STORE, &signer.public_key_b64())?;
        let disk = MemoryDb::new();
        let journal = Journal::in_memory(&disk)?;
        journal.refuse_codes_issued_before(1_000_000)?;
        let hub = Hub {
            disk,
            journal,
            book: OfflineBook::new(&offline_config(), Vec::new(), &[]),
            signer,
            clock_offset_ms: 0,
            epoch: 0,
            attempts: BTreeMap::new(),
            waiting: HashMap::new(),
            draining: false,
        };
        let mut sim = Sim {
            rng: Rng::new(seed),
            now_ms: 1_000_000,
            seq: 0,
            queue: BTreeMap::new(),
            ledger,
            cloud_clock,
            hub,
            cut: false,
            terminals: (0..TERMINALS)
                .map(|_| Terminal {
                    last: None,
                    busy: false,
                })
                .collect(),
            ops: Vec::new(),
            next_id: 0,
            report: SimReport {
                seed,
                ..SimReport::default()
            },
            lost: BTreeSet::new(),
            lost_voids: BTreeSet::new(),
            forgotten: BTreeSet::new(),
            faults_on: true,
        };
        for t in 0..TERMINALS {
            let at = sim.rng.below(50);
            sim.at(at, Happening::Charge(t));
        }
        sim.at(DRAIN_INTERVAL_MS, Happening::Drain);
        sim.at(1_000, Happening::Prune);
        sim.at(EXPIRY_INTERVAL_MS, Happening::Expire);
        // The faults: one of each kind at a seeded time (every run covers every kind), then more
        // at random.
        let kinds = [
            Fault::Cut,
            Fault::CrashHub,
            Fault::WipeHub,
            Fault::ClockBack,
            Fault::ClockForward,
        ];
        for kind in kinds {
            let at = 500 + sim.rng.below(RUN_MS - 3_000);
            sim.at(at, Happening::Fault(kind));
        }
        for _ in 0..sim.rng.below(6) {
            let kind = kinds[sim.rng.below(kinds.len() as u64) as usize];
            let at = 500 + sim.rng.below(RUN_MS - 3_000);
            sim.at(at, Happening::Fault(kind));
        }
        Ok(sim)
    }

    fn at(&mut self, delay_ms: u64, happening: Happening) {
        self.seq += 1;
        self.queue
            .insert((self.now_ms + delay_ms, self.seq), happening);
    }

    fn hub_now(&self) -> u64 {
        (self.now_ms as i64 + self.hub.clock_offset_ms).max(0) as u64
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.faults_on && self.rng.below(100) < percent
    }

    /// Puts a message on the network: lost, duplicated and delayed by the seed.
    fn send_to_cloud(&mut self, request_id: u64, message: ToCloud) {
        if self.cut || self.chance(5) {
            return;
        }
        let copies = if self.chance(5) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(if self.faults_on { 250 } else { 20 });
            self.at(delay, Happening::AtCloud(request_id, message.clone()));
        }
    }

    fn send_to_hub(&mut self, request_id: u64, message: ToHub) {
        if self.cut || self.chance(5) {
            return;
        }
        let copies = if self.chance(5) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(if self.faults_on { 250 } else { 20 });
            let epoch = self.hub.epoch;
            self.at(delay, Happening::AtHub(epoch, request_id, message.clone()));
        }
    }

    fn run(mut self) -> anyhow::Result<SimReport> {
        let mut steps = 0u64;
        while let Some(((at, _), happening)) = self.queue.pop_first() {
            steps += 1;
            if steps > 2_000_000 {
                bail!("the simulation did not settle");
            }
            self.now_ms = at;
            self.cloud_clock.set(at);
            let end = 1_000_000 + RUN_MS;
            if self.now_ms > end && self.faults_on {
                // Heal everything; no new charges; let the hub drain.
                self.faults_on = false;
                self.cut = false;
            }
            if self.now_ms > end + 60_000 + PENDING_TTL_MS {
                break;
            }
            self.happen(happening)?;
        }
        self.check()?;
        Ok(self.report)
    }

    fn happen(&mut self, happening: Happening) -> anyhow::Result<()> {
        match happening {
            Happening::Charge(t) => self.charge(t),
            Happening::Step(id) => self.step(id),
            Happening::Deadline(request_id) => match self.hub.waiting.remove(&request_id) {
                Some(Waiting::Attempt(id)) => self.feed(
                    id,
                    Event::Cloud(CloudResult::Unanswered("deadline passed".into())),
                ),
                Some(Waiting::Status(id)) => {
                    self.feed(id, Event::Status(Err("deadline passed".into())))
                }
                Some(Waiting::Void(_) | Waiting::Post(_) | Waiting::Batch) => {
                    self.hub.draining = false
                }
                None => {}
            },
            Happening::AtCloud(request_id, message) => self.at_cloud(request_id, message)?,
            Happening::AtHub(epoch, request_id, message) => {
                if epoch == self.hub.epoch {
                    self.at_hub(request_id, message)?;
                }
            }
            Happening::Drain => {
                self.drain()?;
                if self.faults_on || !self.quiet()? {
                    self.at(DRAIN_INTERVAL_MS, Happening::Drain);
                }
            }
            Happening::Expire => {
                self.ledger.expire_pending()?;
                if self.faults_on || self.now_ms < 1_000_000 + RUN_MS + 2 * PENDING_TTL_MS {
                    self.at(EXPIRY_INTERVAL_MS, Happening::Expire);
                }
            }
            Happening::Prune => {
                let horizon = CODE_WINDOW_MS + 2 * CLOCK_SKEW_MS;
                let cutoff = self.hub_now().saturating_sub(horizon);
                self.hub.journal.prune_nonces(cutoff)?;
                if self.faults_on {
                    self.at(1_000, Happening::Prune);
                }
            }
            Happening::Fault(fault) => {
                if !self.faults_on {
                    return Ok(());
                }
                *self.report.faults.entry(fault.name()).or_default() += 1;
                match fault {
                    Fault::Cut => {
                        self.cut = true;
                        let hold = 300 + self.rng.below(2_000);
                        self.at(hold, Happening::Heal);
                    }
                    Fault::CrashHub => self.restart_hub(false)?,
                    Fault::WipeHub => self.restart_hub(true)?,
                    Fault::ClockBack => self.hub.clock_offset_ms -= 90_000,
                    Fault::ClockForward => self.hub.clock_offset_ms += 90_000,
                }
            }
            Happening::Heal => self.cut = false,
        }
        Ok(())
    }

    /// Whether nothing is left to deliver.
    fn quiet(&self) -> anyhow::Result<bool> {
        Ok(self.hub.journal.pending_voids()?.is_empty()
            && self.hub.journal.pending_posts()?.is_empty()
            && self.hub.journal.offline_batch(1)?.is_empty()
            && self.hub.attempts.is_empty())
    }

    fn charge(&mut self, t: usize) {
        if !self.faults_on || self.terminals[t].busy {
            return;
        }
        // A cashier retries the last order (its outcome unheard or declined) or rings up a
        // new one; a retry shows the same code again or a fresh one.
        let retry = match (&self.terminals[t].last, self.rng.below(100)) {
            (Some(last), r) if r < 35 => Some(last.clone()),
            _ => None,
        };
        let (order, customer, amount, nonce) = match retry {
            Some((order, customer, amount, nonce)) => {
                let amount = if self.rng.below(100) < 70 {
                    amount
                } else {
                    100 + self.rng.below(1_800) as i64
                };
                // The same code again, while its window is open by the hub's clock (the hub's
                // proof check refuses it before and after; its issue time is the code's own).
                let now = self.hub_now();
                let open = now < nonce.1 + CODE_WINDOW_MS && nonce.1 <= now + CLOCK_SKEW_MS;
                let nonce = if self.rng.below(100) < 30 && open {
                    nonce
                } else {
                    self.fresh_nonce()
                };
                (order, customer, amount, nonce)
            }
            None => {
                self.next_id += 1;
                let order = format!("t{t}-{}", self.next_id);
                let customer = self.rng.below(CUSTOMERS as u64) as usize;
                let amount = 100 + self.rng.below(1_800) as i64;
                (order, customer, amount, self.fresh_nonce())
            }
        };
        self.terminals[t].last = Some((order.clone(), customer, amount, nonce.clone()));
        self.terminals[t].busy = true;
        let request = AuthorizeRequest {
            attestation: None,
            payment_id: protocol::payment_id(STORE, &order),
            store_id: STORE.into(),
            terminal_id: format!("till-{t}").into(),
            order_id: order.as_str().into(),
            amount_minor: amount,
            currency: eur(),
            proof: PaymentProof::Code("simulated".into()),
        };
        let payer = Payer {
            evidence: Default::default(),
            account_id: account(customer),
            nonce: nonce.0,
            keep_from_ms: nonce.1,
            token: false,
            spent_code: None,
        };
        self.ops.push(Op {
            order,
            account: customer,
            amount_minor: amount,
            heard: Heard::Unknown,
            copy: false,
        });
        self.report.attempts += 1;
        let copies = if self.chance(10) { 2 } else { 1 };
        for copy in 0..copies {
            if copy == 1 {
                let op = Op {
                    copy: true,
                    ..self.ops.last().expect("pushed above").clone()
                };
                self.ops.push(op);
                self.report.attempts += 1;
            }
            let delay = self.rng.below(3 + 50 * copy);
            self.submit(t, self.ops.len() - 1, copy == 1, &request, &payer, delay);
        }
    }

    /// A terminal's request reaches the hub after `delay_ms`: a new attempt for operation `op`.
    fn submit(
        &mut self,
        terminal: usize,
        op: usize,
        duplicate: bool,
        request: &AuthorizeRequest,
        payer: &Payer,
        delay_ms: u64,
    ) {
        // The hub's proof check, by its clock: a code outside its window starts an attempt that
        // only finds out whether the code paid the order.
        let now = self.hub_now();
        let (machine, effect) = if now >= payer.keep_from_ms + CODE_WINDOW_MS {
            let refusal = Decision::declined(DeclineReason::CodeExpired, "expired");
            Attempt::start_refused(request, payer.clone(), refusal)
        } else if payer.keep_from_ms > now + CLOCK_SKEW_MS {
            let refusal = Decision::declined(DeclineReason::CodeNotYetValid, "not yet valid");
            Attempt::start_refused(request, payer.clone(), refusal)
        } else {
            Attempt::start(request, payer.clone(), true)
        };
        self.next_id += 1;
        let id = self.next_id;
        self.hub.attempts.insert(
            id,
            InFlight {
                terminal,
                duplicate,
                op,
                request: request.clone(),
                payer: payer.clone(),
                machine,
                effect,
                admitted: false,
            },
        );
        self.at(delay_ms, Happening::Step(id));
    }

    /// The terminal heard nothing back (its link to the hub dropped, or the hub died) and sends
    /// the same request again, as the edge's hub client does: the register hears only the
    /// answer to the copy.
    fn resend(&mut self, flight: InFlight) {
        self.report.resent += 1;
        let delay = 50 + self.rng.below(500);
        let (terminal, op, duplicate) = (flight.terminal, flight.op, flight.duplicate);
        self.submit(
            terminal,
            op,
            duplicate,
            &flight.request,
            &flight.payer,
            delay,
        );
    }

    fn fresh_nonce(&mut self) -> Code {
        (
            format!("{:016x}", self.rng.next_u64()).into(),
            self.hub_now(),
        )
    }

    fn feed(&mut self, id: u64, event: Event) {
        if let Some(flight) = self.hub.attempts.get_mut(&id) {
            if std::env::var("FACEPAY_SIM_TRACE").ok().as_deref()
                == Some(&flight.request.payment_id)
            {
                eprintln!(
                    "{} attempt {id} {:?} <- {event:?}",
                    self.now_ms, flight.payer.nonce
                );
            }
            flight.effect = flight.machine.on(event);
            if std::env::var("FACEPAY_SIM_TRACE").ok().as_deref()
                == Some(&flight.request.payment_id)
            {
                eprintln!("{} attempt {id} -> {:?}", self.now_ms, flight.effect);
            }
            let delay = self.rng.below(3);
            self.at(delay, Happening::Step(id));
        }
    }

    /// Runs an attempt's pending effect (as the payment actor does).
    fn step(&mut self, id: u64) {
        let Some(flight) = self.hub.attempts.get(&id) else {
            return;
        };
        if !flight.admitted {
            // As the payment actor does: a request for a payment being decided hears "in
            // progress" at once.
            let payment_id = flight.request.payment_id.clone();
            let busy = self
                .hub
                .attempts
                .values()
                .any(|f| f.admitted && f.request.payment_id == payment_id);
            if busy {
                let flight = self.hub.attempts.remove(&id).expect("in flight");
                self.report.unknown += 1;
                self.ops[flight.op].heard = Heard::Unknown;
                if !flight.duplicate {
                    self.terminal_free(flight.terminal);
                }
                return;
            }
            self.hub.attempts.get_mut(&id).expect("in flight").admitted = true;
        }
        let Some(flight) = self.hub.attempts.get(&id) else {
            return;
        };
        let (effect, request, payer) = (
            flight.effect.clone(),
            flight.request.clone(),
            flight.payer.clone(),
        );
        let journal = self.hub.journal.clone();
        let event = match effect {
            Effect::LookUpOrder => Event::Order(journal.paid(&request.payment_id).expect("paid")),
            Effect::ReserveNonce => Event::Reserved(
                journal
                    .reserve_nonce(
                        &payer.account_id,
                        &payer.nonce,
                        &request.payment_id,
                        payer.keep_from_ms,
                    )
                    .expect("reserve"),
            ),
            Effect::AskStatus => {
                if self.cut && self.rng.below(2) == 0 {
                    Event::Status(Err("disconnected".into()))
                } else {
                    self.next_id += 1;
                    let request_id = self.next_id;
                    self.hub.waiting.insert(request_id, Waiting::Status(id));
                    self.send_to_cloud(request_id, ToCloud::Status(request.payment_id.clone()));
                    self.at(CLOUD_TIMEOUT_MS, Happening::Deadline(request_id));
                    return;
                }
            }
            Effect::InspectNonce => Event::NonceSeen(
                journal
                    .inspect_nonce(
                        &payer.account_id,
                        &payer.nonce,
                        &request.payment_id,
                        payer.keep_from_ms,
                    )
                    .expect("inspect"),
            ),
            Effect::RecordAttempt(record) => match journal.begin_attempt(&record).expect("begin") {
                true => Event::AttemptRecorded,
                false => Event::AttemptRefused,
            },
            Effect::Send(_) => {
                if self.cut && self.rng.below(2) == 0 {
                    // The hub knows the broker is gone: refused before publishing.
                    Event::Cloud(CloudResult::NotSent("disconnected".into()))
                } else {
                    self.next_id += 1;
                    let request_id = self.next_id;
                    self.hub.waiting.insert(request_id, Waiting::Attempt(id));
                    let authorize = Attempt::cloud_request(
                        &request,
                        &payer,
                        self.hub.book.reservation(&payer.account_id),
                    );
                    self.send_to_cloud(request_id, ToCloud::Authorize(authorize));
                    self.at(CLOUD_TIMEOUT_MS, Happening::Deadline(request_id));
                    return;
                }
            }
            Effect::DropAttempt(record) => {
                journal.drop_attempt(&record).expect("drop");
                Event::AttemptDropped
            }
            Effect::DecideOffline { .. } => Event::Offline(self.decide_offline(&request, &payer)),
            Effect::Void(record) => {
                journal.void_attempt(&record).expect("void");
                Event::Voided
            }
            Effect::Finish(outcome) => {
                self.finish(id, outcome);
                return;
            }
        };
        self.feed(id, event);
    }

    fn decide_offline(&mut self, request: &AuthorizeRequest, payer: &Payer) -> Decision {
        if let Err(declined) =
            self.hub
                .book
                .check(&payer.account_id, request.amount_minor, request.currency)
        {
            return declined;
        }
        let mut entry = OfflinePayment {
            seq: self.hub.journal.next_seq().expect("seq"),
            payment_id: request.payment_id.clone(),
            store_id: STORE.into(),
            terminal_id: request.terminal_id.clone(),
            order_id: request.order_id.clone(),
            account_id: payer.account_id.clone(),
            nonce: payer.nonce.clone(),
            amount_minor: request.amount_minor,
            currency: request.currency,
            approved_at_ms: self.hub_now(),
            allowance_version: self.hub.book.grant_version(&payer.account_id),
            spent_code: None,
            signature: String::new(),
        };
        self.hub.signer.sign(&mut entry);
        self.hub
            .journal
            .record_offline(&entry)
            .expect("record offline");
        self.hub.book.approved(&entry);
        Decision::Approved {
            account_id: payer.account_id.clone(),
            already_paid: false,
        }
    }

    fn finish(&mut self, id: u64, outcome: Outcome) {
        let flight = self.hub.attempts.remove(&id).expect("in flight");
        let mut entry =
            JournalEntry::for_request(&flight.request, outcome.decision.clone(), self.hub_now());
        entry.account_id = Some(flight.payer.account_id.clone());
        entry.code_nonce = Some(flight.payer.nonce.clone());
        self.hub
            .journal
            .record(&entry, outcome.answered_attempt.as_ref())
            .expect("record");
        // The answer is lost on its way to the terminal (its link to the hub dropped): the
        // terminal asks again.
        if self.chance(3) {
            self.resend(flight);
            return;
        }
        let heard = match &outcome.decision {
            Decision::Approved { .. } => {
                self.report.approved += 1;
                if outcome.offline {
                    self.report.approved_offline += 1;
                }
                Heard::Approved {
                    offline: outcome.offline,
                }
            }
            // What the edge tells the register: "in progress" is not known, not declined.
            Decision::Declined { reason, .. } if reason.is_unknown_outcome() => {
                self.report.unknown += 1;
                Heard::Unknown
            }
            Decision::Declined { reason, .. } => {
                self.report.declined += 1;
                Heard::Declined(*reason)
            }
        };
        self.ops[flight.op].heard = heard;
        if !flight.duplicate {
            self.terminal_free(flight.terminal);
        }
    }

    fn terminal_free(&mut self, t: usize) {
        self.terminals[t].busy = false;
        let think = 5 + self.rng.below(60);
        self.at(think, Happening::Charge(t));
    }

    /// The cloud applies what arrives, in arrival order, and answers.
    fn at_cloud(&mut self, request_id: u64, message: ToCloud) -> anyhow::Result<()> {
        if let Ok(traced) = std::env::var("FACEPAY_SIM_TRACE") {
            if format!("{message:?}").contains(&format!("{traced:?}")) {
                eprintln!("{} cloud <- {request_id} {message:?}", self.now_ms);
            }
        }
        match message {
            ToCloud::Authorize(request) => {
                let (decision, allowance) =
                    self.ledger.authorize_with_allowance(STORE, &request)?;
                // The cloud may fail after it applied (its reply is an error): ambiguous.
                let reply = if self.chance(3) {
                    ToHub::Failed
                } else {
                    let payment_id = if self.chance(2) {
                        // A reply about another payment reaches this request.
                        "store-1:misrouted".into()
                    } else {
                        request.payment_id.clone()
                    };
                    ToHub::Authorized {
                        payment_id,
                        decision,
                        allowance,
                    }
                };
                self.send_to_hub(request_id, reply);
            }
            ToCloud::Status(payment_id) => {
                let status = self.ledger.payment_status(STORE, &payment_id)?;
                let reply = if self.chance(3) {
                    ToHub::Failed
                } else {
                    ToHub::Status { payment_id, status }
                };
                self.send_to_hub(request_id, reply);
            }
            ToCloud::Void(void) => {
                self.ledger.void(STORE, &void)?;
                self.send_to_hub(
                    request_id,
                    ToHub::Voided {
                        payment_id: void.payment_id,
                    },
                );
            }
            ToCloud::Post(posts) => {
                for post in &posts {
                    self.ledger.post(STORE, post)?;
                }
                self.send_to_hub(
                    request_id,
                    ToHub::Posted {
                        payment_ids: posts.into_iter().map(|p| p.payment_id).collect(),
                    },
                );
            }
            ToCloud::Reconcile(entries) => {
                let done = self.ledger.reconcile(STORE, &entries)?;
                let results = entries
                    .iter()
                    .zip(done.outcomes)
                    .map(|(entry, outcome)| ReconcileResult {
                        seq: entry.seq,
                        payment_id: entry.payment_id.clone(),
                        outcome,
                    })
                    .collect();
                if !done.revocations.is_empty() {
                    self.send_to_hub(0, ToHub::Allowances(done.revocations));
                }
                self.send_to_hub(request_id, ToHub::Reconciled(results));
            }
        }
        Ok(())
    }

    fn at_hub(&mut self, request_id: u64, message: ToHub) -> anyhow::Result<()> {
        if let ToHub::Allowances(allowances) = &message {
            for allowance in allowances {
                self.hub.book.set_allowance(allowance.clone());
            }
            self.hub.journal.store_allowances(allowances)?;
            return Ok(());
        }
        let Some(waiting) = self.hub.waiting.remove(&request_id) else {
            return Ok(()); // late or duplicated: dropped, as the uplink does
        };
        match (waiting, message) {
            (
                Waiting::Attempt(id),
                ToHub::Authorized {
                    payment_id,
                    decision,
                    allowance,
                },
            ) => {
                let expected = self
                    .hub
                    .attempts
                    .get(&id)
                    .map(|f| f.request.payment_id.clone());
                if let (Some(allowance), true) = (allowance, expected == Some(payment_id.clone())) {
                    self.hub.book.set_allowance(allowance.clone());
                    self.hub.journal.store_allowances(&[allowance])?;
                }
                self.feed(
                    id,
                    Event::Cloud(CloudResult::Answered {
                        payment_id,
                        decision,
                    }),
                );
            }
            (Waiting::Attempt(id), _) => self.feed(
                id,
                Event::Cloud(CloudResult::Unanswered("the cloud failed".into())),
            ),
            (Waiting::Status(id), ToHub::Status { payment_id, status }) => {
                let asked = self
                    .hub
                    .attempts
                    .get(&id)
                    .map(|f| f.request.payment_id.clone());
                let event = if asked == Some(payment_id.clone()) {
                    Event::Status(Ok(status))
                } else {
                    Event::Status(Err(format!("an answer about {payment_id}")))
                };
                self.feed(id, event);
            }
            (Waiting::Status(id), _) => {
                self.feed(id, Event::Status(Err("the cloud failed".into())))
            }
            (Waiting::Void(void), ToHub::Voided { payment_id })
                if payment_id == void.payment_id =>
            {
                self.hub.journal.retire_void(&void)?;
                self.hub.draining = false;
                self.drain()?;
            }
            (Waiting::Post(posts), ToHub::Posted { payment_ids })
                if payment_ids.iter().eq(posts.iter().map(|p| &p.payment_id)) =>
            {
                for post in &posts {
                    self.hub.journal.retire_post(post)?;
                }
                self.hub.draining = false;
                self.drain()?;
            }
            (Waiting::Batch, ToHub::Reconciled(results)) => {
                let sorted = hub::book::sort_results(&results);
                let mut retired = self.hub.journal.retire_offline(&sorted.settled)?;
                for (seq, detail) in &sorted.conflicts {
                    retired.extend(self.hub.journal.keep_conflict(*seq, detail)?);
                }
                for entry in &retired {
                    self.hub.book.release(
                        &entry.account_id,
                        entry.allowance_version,
                        entry.amount_minor,
                    );
                }
                self.hub.draining = false;
                if sorted.refused == 0 {
                    self.drain()?;
                }
            }
            _ => self.hub.draining = false,
        }
        Ok(())
    }

    /// The hub's drain, as the offline actor does it: voids first (read again every time), then
    /// one batch; one request in flight.
    fn drain(&mut self) -> anyhow::Result<()> {
        if self.hub.draining || (self.cut && self.rng.below(2) == 0) {
            return Ok(());
        }
        if let Some(void) = self.hub.journal.pending_voids()?.into_iter().next() {
            self.drain_request(Waiting::Void(void.clone()), ToCloud::Void(void));
            return Ok(());
        }
        let posts: Vec<VoidPayment> = self
            .hub
            .journal
            .pending_posts()?
            .into_iter()
            .take(20)
            .collect();
        if !posts.is_empty() {
            self.drain_request(Waiting::Post(posts.clone()), ToCloud::Post(posts));
            return Ok(());
        }
        let batch = self.hub.journal.offline_batch(5)?;
        if !batch.is_empty() {
            self.drain_request(Waiting::Batch, ToCloud::Reconcile(batch));
        }
        Ok(())
    }

    /// Sends the drain's one request in flight, with its deadline.
    fn drain_request(&mut self, waiting: Waiting, message: ToCloud) {
        self.next_id += 1;
        let request_id = self.next_id;
        self.hub.waiting.insert(request_id, waiting);
        self.hub.draining = true;
        self.send_to_cloud(request_id, message);
        self.at(CLOUD_TIMEOUT_MS * 3, Happening::Deadline(request_id));
    }

    /// The hub crashes: what was in flight is lost (the cashiers hear nothing), and it starts
    /// again with its disk (voiding the attempts it never closed) or without it.
    fn restart_hub(&mut self, wipe: bool) -> anyhow::Result<()> {
        let in_flight = std::mem::take(&mut self.hub.attempts);
        let mut resend = Vec::new();
        for (_, flight) in in_flight {
            if self.rng.below(2) == 0 {
                resend.push(flight);
                continue;
            }
            self.report.unknown += 1;
            if flight.duplicate {
                continue;
            }
            self.terminals[flight.terminal].busy = false;
            let think = 5 + self.rng.below(60);
            self.seq += 1;
            self.queue.insert(
                (self.now_ms + think, self.seq),
                Happening::Charge(flight.terminal),
            );
        }
        self.hub.waiting.clear();
        self.hub.draining = false;
        self.hub.epoch += 1;
        if wipe {
            for entry in self.hub.journal.offline_entries()? {
                self.lost.insert(entry.payment_id);
            }
            // What the hub approved is forgotten too: a retry of such an order goes to the
            // cloud again, and its void can move back money the register heard approved.
            for decision in self.hub.journal.decisions()? {
                if matches!(decision.decision, Decision::Approved { .. }) {
                    self.forgotten.insert(decision.payment_id);
                }
            }
            self.report.lost_with_disk = self.lost.len();
            let journal = &self.hub.journal;
            for void in journal
                .pending_voids()?
                .into_iter()
                .chain(journal.open_attempts()?)
            {
                self.lost_voids.insert(void.payment_id);
            }
            self.hub.disk = MemoryDb::new();
        }
        // The restarted hub opens its journal again, on what its disk holds: every write was
        // complete before its caller went on, so that is exactly what a flushed disk would hold.
        self.hub.journal = Journal::in_memory(&self.hub.disk)?;
        // What a hub does at every start: a journal created empty refuses older codes.
        self.hub
            .journal
            .refuse_codes_issued_before(self.hub_now())?;
        self.hub.journal.recover_attempts()?;
        self.hub.book = OfflineBook::new(
            &offline_config(),
            self.hub.journal.allowances()?,
            &self.hub.journal.offline_entries()?,
        );
        for flight in resend {
            self.resend(flight);
        }
        Ok(())
    }

    /// The history against the ledger.
    fn check(&mut self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if !self.quiet()? {
            problems.push("the hub did not drain after the faults healed".to_owned());
        }
        if !self.hub.journal.open_attempts()?.is_empty() {
            problems.push("attempts left open".to_owned());
        }
        let transfers = self.ledger.transfers()?;
        let ids: BTreeSet<&str> = transfers.iter().map(|t| t.transfer_id.as_str()).collect();
        let by_id: HashMap<&str, &protocol::TransferView> = transfers
            .iter()
            .map(|t| (t.transfer_id.as_str(), t))
            .collect();
        let live = |payment_id: &str| -> Vec<&protocol::TransferView> {
            let mut found = Vec::new();
            if let (Some(t), false) = (
                by_id.get(payment_id),
                ids.contains(format!("{payment_id}#void").as_str()),
            ) {
                found.push(*t);
            }
            for charged in ["offline", "posted"] {
                if let Some(t) = by_id.get(format!("{payment_id}#{charged}").as_str()) {
                    found.push(*t);
                }
            }
            found
        };
        let mut orders: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for op in &self.ops {
            orders.entry(op.order.as_str()).or_default().push(op);
        }
        // Offline approvals the cloud could not apply as approved, kept for an operator.
        let conflicts: BTreeMap<PaymentId, String> = self
            .ledger
            .conflicts()?
            .into_iter()
            .map(|c| (c.entry.payment_id, c.detail))
            .collect();
        let mut spent: HashMap<AccountId, i64> = HashMap::new();
        for (order, ops) in &orders {
            let payment_id = protocol::payment_id(STORE, order);
            let found = live(&payment_id);
            let approved: Vec<&&Op> = ops
                .iter()
                .filter(|o| matches!(o.heard, Heard::Approved { .. }))
                .collect();
            let heard = || {
                let mut told: Vec<String> = ops
                    .iter()
                    .map(|o| format!("{}:{}:{:?}", account(o.account), o.amount_minor, o.heard))
                    .collect();
                if self.lost.contains(&payment_id) {
                    told.push("offline approval lost with the disk".into());
                }
                if self.lost_voids.contains(&payment_id) {
                    told.push("void lost with the disk".into());
                }
                if self.forgotten.contains(&payment_id) {
                    told.push("approval forgotten with the disk".into());
                }
                if let Some(detail) = conflicts.get(&payment_id) {
                    told.push(format!("kept as a conflict: {detail}"));
                }
                told.join(", ")
            };
            if found.len() > 1 {
                problems.push(format!(
                    "{payment_id} paid {} times ({})",
                    found.len(),
                    heard()
                ));
                continue;
            }
            if let Some(t) = found.first() {
                spent
                    .entry(t.debit_account_id.clone())
                    .and_modify(|s| *s += t.amount_minor)
                    .or_insert(t.amount_minor);
                let invoked = ops.iter().any(|o| {
                    account(o.account) == t.debit_account_id && o.amount_minor == t.amount_minor
                });
                if !invoked {
                    problems.push(format!(
                        "{payment_id} in the ledger as {t:?}, never invoked so"
                    ));
                }
            }
            let lost = self.lost.contains(&payment_id);
            let same = |o: &&&Op, t: &protocol::TransferView| {
                account(o.account) == t.debit_account_id && o.amount_minor == t.amount_minor
            };
            if approved.iter().any(|o| {
                (o.account, o.amount_minor) != (approved[0].account, approved[0].amount_minor)
            }) && !lost
                && !self.forgotten.contains(&payment_id)
            {
                problems.push(format!(
                    "{payment_id} heard approved with different details ({})",
                    heard()
                ));
            }
            if !approved.is_empty() {
                let forgotten = self.forgotten.contains(&payment_id);
                let conflicted =
                    conflicts.contains_key(&payment_id) && self.lost_voids.contains(&payment_id);
                match found.first() {
                    // The costs of a wiped hub disk, stated and counted: an offline approval
                    // that never reaches the cloud; an online approval never confirmed, which
                    // the cloud moves back when it expires; an offline approval in conflict
                    // with a pending attempt whose void was lost.
                    None if lost => {}
                    None if forgotten => self.report.reversed_after_approval_with_disk_lost += 1,
                    None if conflicted => self.report.conflicts_with_disk_lost += 1,
                    // The hub forgot the order (its disk was lost), approved the register's next
                    // charge of it offline with other details, and lost that approval too before
                    // it reached the cloud (which would have kept it as a conflict): the ledger
                    // holds the charge the cloud confirmed, and the lost approval is the cost.
                    Some(t)
                        if lost
                            && !approved.iter().any(|o| same(o, t))
                            && approved
                                .iter()
                                .all(|o| matches!(o.heard, Heard::Approved { offline: true }))
                            && ops.iter().filter(|o| same(o, t)).all(|o| {
                                matches!(
                                    o.heard,
                                    Heard::Unknown
                                        | Heard::Declined(DeclineReason::DuplicateOrderId)
                                )
                            }) =>
                    {
                        self.report.lost_with_disk_after_another_charge += 1
                    }
                    None => problems.push(format!(
                        "{payment_id} heard approved, not in the ledger ({})",
                        heard()
                    )),
                    Some(t) if !approved.iter().any(|o| same(o, t)) => problems.push(format!(
                        "{payment_id} heard approved ({}), ledger has {t:?}",
                        heard()
                    )),
                    Some(_) => {}
                }
            } else if ops.iter().all(|o| matches!(o.heard, Heard::Declined(_))) && !found.is_empty()
            {
                problems.push(format!(
                    "{payment_id} heard only declined, but paid in the ledger ({})",
                    heard()
                ));
            }
            // What the register heard last about the order stands: a decline (other than "paid
            // with other details") of an order paid with that charge's account and amount is a
            // lie, whatever it heard before, unless a copy of a charge (a second till's) heard
            // it approved. A terminal's charges follow one another, so the last one it made (not
            // a copy) was answered last.
            let last = ops.iter().rev().find(|o| !o.copy);
            if let (Some(last), Some(t)) = (last, found.first()) {
                let declined = matches!(
                    last.heard,
                    Heard::Declined(reason) if reason != DeclineReason::DuplicateOrderId
                );
                let forgotten = self.forgotten.contains(&payment_id)
                    && !matches!(
                        last.heard,
                        Heard::Declined(
                            DeclineReason::CodeExpired | DeclineReason::CodeNotYetValid
                        )
                    );
                if declined && forgotten {
                    self.report.declined_after_approval_with_disk_lost += 1;
                } else if declined && same(&last, t) && !approved.iter().any(|o| same(o, t)) {
                    problems.push(format!(
                        "{payment_id} heard declined last, but paid so in the ledger ({})",
                        heard()
                    ));
                }
            }
        }
        // Each account's balance is what the history implies, not merely a sum that balances.
        for n in 0..CUSTOMERS {
            let id = account(n);
            let expected = OPENING_BALANCE - spent.get(&id).copied().unwrap_or(0);
            let held = self
                .ledger
                .account(&id)?
                .map(|a| a.balance_minor)
                .unwrap_or_default();
            if held != expected {
                problems.push(format!("{id} holds {held}, its history implies {expected}"));
            }
        }
        let store_expected: i64 = spent.values().sum();
        let store_held = self
            .ledger
            .account(STORE)?
            .map(|a| a.balance_minor)
            .unwrap_or_default();
        if store_held != store_expected {
            problems.push(format!(
                "{STORE} holds {store_held}, its history implies {store_expected}"
            ));
        }
        if !problems.is_empty() {
            bail!(
                "seed {}: {} problems:\n  {}",
                self.report.seed,
                problems.len(),
                problems.join("\n  ")
            );
        }
        Ok(())
    }
}

/// Runs one seed; the error names it and what went wrong.
pub fn run_seed(seed: u64) -> anyhow::Result<SimReport> {
    let sim = Sim::new(seed)?;
    let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    match report {
        Ok(report) => report,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            bail!("seed {seed}: panicked: {what}")
        }
    }
}

/// Runs `count` seeds from `first`, on as many threads as the machine has cores (each seed is
/// independent and runs on one thread, so it does the same whichever thread runs it). Returns the
/// reports in seed order; on failures, the lowest failing seed's error (once a seed fails, seeds
/// not yet started are skipped).
pub fn run_seeds(first: u64, count: u64) -> anyhow::Result<Vec<SimReport>> {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    };
    let next = AtomicU64::new(first);
    let failed = AtomicBool::new(false);
    let results = Mutex::new(BTreeMap::new());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads.min(count.max(1) as usize) {
            scope.spawn(|| {
                while !failed.load(Ordering::SeqCst) {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= first + count {
                        break;
                    }
                    let result = run_seed(seed);
                    if result.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    results
                        .lock()
                        .expect("no thread panics holding it")
                        .insert(seed, result);
                }
            });
        }
    });
    let results = results.into_inner().expect("no thread panics holding it");
    if let Some((_, Err(e))) = results.iter().find(|(_, r)| r.is_err()) {
        bail!("{e:#}");
    }
    Ok(results.into_values().map(|r| r.expect("checked")).collect())
}

/// Shared for the binary and the test: the default first seed (printed, so a run replays).
pub fn default_seed() -> u64 {
    std::env::var("FACEPAY_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(paycode::now_ms)
}
