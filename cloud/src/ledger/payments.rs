//! Online payments as two-phase transfers: authorize (pending), post, void, expire; late posts
//! charged again once. The transfer's states are drawn in ARCHITECTURE.md.

use super::*;

impl Ledger {
    /// Applies a verified payment from `store_id`: moves the amount from the customer to the store's
    /// merchant account (whose id is the store id), exactly once per payment id.
    /// Whether the attempt's nonce was seen already (answered, or burnt by a void): the ledger
    /// answers it from its record and proves nothing, so its evidence need not be read. Read
    /// outside a transaction: true only on the ledger's single writer thread.
    pub fn nonce_seen(&self, request: &CloudAuthorize) -> Result<bool, LedgerError> {
        let key = nonce_key(&request.account_id, &request.code_nonce);
        Ok(self
            .nonces
            .get(key)
            .map_err(|e| LedgerError::Storage(e.to_string()))?
            .is_some())
    }

    /// The payer is taken as proven (the caller checked it): [`Ledger::authorize_proving`]
    /// checks it.
    pub fn authorize(
        &self,
        store_id: &str,
        request: &CloudAuthorize,
    ) -> Result<Decision, LedgerError> {
        self.authorize_with_allowance(store_id, request)
            .map(|(decision, _)| decision)
    }

    /// [`Ledger::authorize`], and on approval the account's refreshed offline allowance at the
    /// store (see [`OfflinePolicy`]). The payer is taken as proven.
    pub fn authorize_with_allowance(
        &self,
        store_id: &str,
        request: &CloudAuthorize,
    ) -> Result<(Decision, Option<Allowance>), LedgerError> {
        self.authorize_proving(store_id, request, &|_, _| Ok(()))
    }

    /// [`Ledger::authorize_with_allowance`], with `prove` checking the payer (given the
    /// account's payment key) where the attempt would move money, and only there: a new attempt
    /// at an order not paid. Its refusal is recorded under the nonce like any decline, so a
    /// repeat (a redelivery) hears it again, and an attempt at a paid order hears it is paid
    /// whatever it shows. `prove` runs inside the ledger's transaction and must read no store
    /// (a sled transaction holds the lock every read takes: it would never return).
    pub fn authorize_proving(
        &self,
        store_id: &str,
        request: &CloudAuthorize,
        prove: &ProvePayer<'_>,
    ) -> Result<(Decision, Option<Allowance>), LedgerError> {
        // A hub's request is checked where it is used, against the store that sent it: a payment
        // outside its namespace never touches another store's (or an internal) transfer, and an
        // amount out of range never reaches the balances (a negative one would pay the customer).
        request.check_from(store_id).map_err(invalid)?;
        let nonce_key = nonce_key(&request.account_id, &request.code_nonce);
        let policy = self.policy;
        let now_ms = self.clock.now_ms();
        let trees = (
            &self.accounts,
            &self.transfers,
            &self.nonces,
            &self.grants,
            &self.grants_by_account,
            &self.pending,
        );
        let deadline_ms = now_ms.saturating_add(self.pending_ttl_ms);
        let answer = unwrap_tx(trees.transaction(
            |(accounts, transfers, nonces, grants, by_account, pending)| {
                let (decision, moved) = match confirmed_code_paid_elsewhere(nonces, request)? {
                    Some(decline) => {
                        let record = NonceRecord {
                            payment_id: request.payment_id.clone(),
                            decision: decline.clone(),
                            amount: Some((request.amount_minor, request.currency)),
                        };
                        nonces.insert(nonce_key.as_slice(), encode(&record))?;
                        (decline, false)
                    }
                    None => {
                        let (decision, moved) = Self::authorize_tx(
                            (accounts, transfers, nonces, pending),
                            store_id,
                            request,
                            &nonce_key,
                            (now_ms, deadline_ms),
                            prove,
                        )?;
                        burn_confirmed_code(nonces, request, &decision)?;
                        (decision, moved)
                    }
                };
                // A grant is earned by a payment that moved money now, never by a repeat of
                // one (each grant is a budget of its own: repeats would multiply it).
                let allowance = match &decision {
                    Decision::Approved { .. } if moved => allowances::grant(
                        policy,
                        accounts,
                        grants,
                        by_account,
                        store_id,
                        &request.account_id,
                        request.offline_reservation,
                    )?,
                    _ => None,
                };
                Ok((decision, allowance))
            },
        ))?;
        self.flush()?;
        Ok(answer)
    }

    /// One authorization, in the ledger's transaction. The request's own code nonce is looked up
    /// first: a nonce already seen answers what it was answered then (a hub repeating a request it
    /// got no answer to), or, for another payment, is a replay; a nonce a void burnt never reaches
    /// the order's transfer. Only an unseen nonce may pay, or take over the order's transfer as
    /// its latest attempt. Every answer is recorded under the nonce, so that a later void of this
    /// attempt knows what it voids and a repeat hears the same answer.
    fn authorize_tx(
        (accounts, transfers, nonces, pending): (
            &storage::kv::TransactionalTree,
            &storage::kv::TransactionalTree,
            &storage::kv::TransactionalTree,
            &storage::kv::TransactionalTree,
        ),
        store_id: &str,
        request: &CloudAuthorize,
        nonce_key: &[u8],
        (now_ms, deadline_ms): (u64, u64),
        prove: &ProvePayer<'_>,
    ) -> TxResult<(Decision, bool)> {
        if let Some(seen) = nonces.get(nonce_key)? {
            let seen: NonceRecord = decode(&seen);
            let same_details = seen
                .amount
                .is_none_or(|amount| amount == (request.amount_minor, request.currency));
            let answer = if seen.payment_id == request.payment_id && !same_details {
                Decision::declined(
                    DeclineReason::DuplicateOrderId,
                    "this code was already presented for this order with another amount",
                )
            } else if seen.payment_id == request.payment_id {
                let transfer: Option<TransferRecord> = transfers
                    .get(request.payment_id.as_bytes())?
                    .map(|b| decode(&b));
                let charged_later =
                    charged_again(transfers, &request.payment_id)?.is_some_and(|t| {
                        t.debit_account_id == request.account_id
                            && t.amount_minor == request.amount_minor
                    });
                match (&seen.decision, transfer) {
                    // Moved back, then charged again (an offline approval, a late post): paid.
                    (Decision::Approved { .. }, Some(t)) if t.voided && charged_later => {
                        Decision::Approved {
                            account_id: request.account_id.clone(),
                            already_paid: true,
                        }
                    }
                    // Paid then, moved back since (by a later attempt's void): not paid now.
                    (Decision::Approved { .. }, Some(t)) if t.voided => Decision::declined(
                        DeclineReason::DuplicateOrderId,
                        "this order's payment was voided; charge it under a new order id",
                    ),
                    _ => seen.decision,
                }
            } else {
                Decision::declined(
                    DeclineReason::CodeReplayed,
                    "this payment code was already used; show a fresh code",
                )
            };
            return Ok((answer, false));
        }
        // An order a hub approved offline (applied as `#offline` after an online attempt under it
        // was voided), or confirmed after it expired (`#posted`), is paid: a retry hears so,
        // never "charge it under a new order id".
        if let Some(paid) = charged_again(transfers, &request.payment_id)? {
            let decision = if paid.debit_account_id == request.account_id
                && paid.amount_minor == request.amount_minor
                && paid.currency == request.currency
            {
                Decision::Approved {
                    account_id: request.account_id.clone(),
                    already_paid: true,
                }
            } else {
                Decision::declined(
                    DeclineReason::DuplicateOrderId,
                    format!(
                        "order {} was already paid with other details",
                        request.order_id
                    ),
                )
            };
            let record = NonceRecord {
                payment_id: request.payment_id.clone(),
                decision: decision.clone(),
                amount: Some((request.amount_minor, request.currency)),
            };
            nonces.insert(nonce_key, encode(&record))?;
            return Ok((decision, false));
        }
        // Whether this attempt moved money (not one answered as paid by another).
        let mut moved = false;
        let decision = match transfers.get(request.payment_id.as_bytes())? {
            Some(existing) => {
                let existing: TransferRecord = decode(&existing);
                let same = existing.debit_account_id == request.account_id
                    && existing.credit_account_id == store_id
                    && existing.amount_minor == request.amount_minor
                    && existing.currency == request.currency;
                if existing.voided {
                    Decision::declined(
                        DeclineReason::DuplicateOrderId,
                        "this order's payment was voided; charge it under a new order id",
                    )
                } else if same && !existing.offline && !existing.posted {
                    // This attempt is told "approved" too: the money moves back only when every
                    // attempt told so is voided (a void of an earlier attempt that timed out
                    // must not reverse what this one may tell the register, nor a late attempt's
                    // void what an earlier one told it). Joining keeps money moved, so the payer
                    // is proven here too. The joining attempt gets the full time to be posted:
                    // its deadline moves.
                    if Self::prove_payer(accounts, request, prove)?.is_err() {
                        // Not proven, it does not join; but the order is paid unless the open
                        // attempt is voided, so "declined" could be a lie: its outcome is not
                        // known yet (nothing recorded: asked again once the open attempt is
                        // posted or voided, it hears which).
                        return Ok((
                            Decision::declined(
                                DeclineReason::PaymentInProgress,
                                "this order's payment is still open and this attempt does not \
                                 prove its payer; charge the same order id again to learn its \
                                 outcome",
                            ),
                            false,
                        ));
                    } else {
                        let mut holders = existing.holders();
                        holders.push(request.code_nonce.clone());
                        if let Some(old) = existing.pending_until_ms {
                            pending.remove(pending_key(old, &request.payment_id))?;
                        }
                        pending.insert(
                            pending_key(deadline_ms, &request.payment_id),
                            request.payment_id.as_bytes(),
                        )?;
                        let held = TransferRecord {
                            approved_nonces: holders,
                            pending_until_ms: Some(deadline_ms),
                            ..existing.clone()
                        };
                        transfers.insert(request.payment_id.as_bytes(), encode(&held))?;
                        Decision::Approved {
                            account_id: request.account_id.clone(),
                            already_paid: true,
                        }
                    }
                } else if same {
                    // Final already (posted, or a hub's offline approval, which stays its own):
                    // the answer changes nothing.
                    Decision::Approved {
                        account_id: request.account_id.clone(),
                        already_paid: true,
                    }
                } else {
                    // Which payer and how much stay out of it: whoever asks may not be the payer.
                    Decision::declined(
                        DeclineReason::DuplicateOrderId,
                        format!(
                            "order {} was already paid with other details",
                            request.order_id
                        ),
                    )
                }
            }
            None => {
                // Where an attempt moves money: the payer is proven here, or declined.
                let decision = match Self::prove_payer(accounts, request, prove)? {
                    Err(refused) => refused,
                    Ok(()) => Self::try_apply(
                        accounts,
                        transfers,
                        store_id,
                        request,
                        now_ms,
                        deadline_ms,
                    )?,
                };
                if let Decision::Approved { .. } = decision {
                    moved = true;
                    pending.insert(
                        pending_key(deadline_ms, &request.payment_id),
                        request.payment_id.as_bytes(),
                    )?;
                }
                decision
            }
        };
        let record = NonceRecord {
            payment_id: request.payment_id.clone(),
            decision: decision.clone(),
            amount: Some((request.amount_minor, request.currency)),
        };
        nonces.insert(nonce_key, encode(&record))?;
        Ok((decision, moved))
    }

    /// The payer proven by `prove` (given the account's payment key), or the decline; a proof
    /// that could not be checked fails the transaction.
    fn prove_payer(
        accounts: &storage::kv::TransactionalTree,
        request: &CloudAuthorize,
        prove: &ProvePayer<'_>,
    ) -> TxResult<Result<(), Decision>> {
        let key = accounts
            .get(request.account_id.as_bytes())?
            .and_then(|b| decode::<AccountRecord>(&b).public_key);
        match prove(request, key.as_deref()) {
            Ok(()) => Ok(Ok(())),
            Err(PayerRefusal::Declined(refused)) => Ok(Err(refused)),
            Err(PayerRefusal::Unavailable(error)) => abort(LedgerError::Unavailable(error)),
        }
    }

    fn try_apply(
        accounts: &storage::kv::TransactionalTree,
        transfers: &storage::kv::TransactionalTree,
        store_id: &str,
        request: &CloudAuthorize,
        now_ms: u64,
        deadline_ms: u64,
    ) -> TxResult<Decision> {
        let Some(customer) = accounts.get(request.account_id.as_bytes())? else {
            return Ok(Decision::declined(
                DeclineReason::UnknownAccount,
                format!("no account {}", request.account_id),
            ));
        };
        let mut customer: AccountRecord = decode(&customer);
        if customer.closed {
            return Ok(Decision::declined(
                DeclineReason::UnknownAccount,
                format!("account {} is closed", request.account_id),
            ));
        }
        if customer.kind != AccountKind::Customer {
            return Ok(Decision::declined(
                DeclineReason::UnknownAccount,
                format!("{} is not a customer account", request.account_id),
            ));
        }
        let Some(merchant) = accounts.get(store_id.as_bytes())? else {
            return Ok(Decision::declined(
                DeclineReason::UnknownAccount,
                format!("store {store_id} has no merchant account"),
            ));
        };
        let mut merchant: AccountRecord = decode(&merchant);
        if customer.currency != request.currency || merchant.currency != request.currency {
            return Ok(Decision::declined(
                DeclineReason::CurrencyMismatch,
                format!(
                    "payment in {} but the account holds {} and the store {}",
                    request.currency, customer.currency, merchant.currency
                ),
            ));
        }
        if customer.balance_minor < request.amount_minor {
            return Ok(Decision::declined(
                DeclineReason::InsufficientFunds,
                format!(
                    "balance {} does not cover {}",
                    customer.currency.format(customer.balance_minor),
                    request.currency.format(request.amount_minor)
                ),
            ));
        }
        apply_transfer(
            accounts,
            (&request.account_id, &mut customer),
            (store_id, &mut merchant),
            request.amount_minor,
        )?;
        let transfer = TransferRecord {
            pending_until_ms: Some(deadline_ms),
            ..TransferRecord::payment(store_id, request, false, now_ms)
        };
        transfers.insert(request.payment_id.as_bytes(), encode(&transfer))?;
        Ok(Decision::Approved {
            account_id: request.account_id.clone(),
            already_paid: false,
        })
    }

    /// Voids a payment attempt whose answer a hub did not receive. If that attempt moved money
    /// and the payment is still pending, and no other attempt told "approved" for it stands, a
    /// reversing transfer `<payment id>#void` moves it back; if it never arrived, its code is
    /// burnt so that a late delivery cannot apply it or join the order's transfer. Either way the
    /// attempt's nonce now answers "voided", so a repeat of the attempt cannot be told "approved"
    /// for money that moved back. A posted payment is final: a void leaves it. Returns whether
    /// money was moved back. Idempotent.
    pub fn void(&self, store_id: &str, request: &VoidPayment) -> Result<bool, LedgerError> {
        // A store voids only attempts of its own payments.
        request.check_from(store_id).map_err(invalid)?;
        let nonce_key = nonce_key(&request.account_id, &request.code_nonce);
        let now_ms = self.clock.now_ms();
        let voided = voided_nonce(&request.payment_id);
        let trees = (&self.accounts, &self.transfers, &self.nonces, &self.pending);
        let reversed = unwrap_tx(trees.transaction(
            |(accounts, transfers, nonces, pending)| -> TxResult<bool> {
                if let Some(existing) = transfers.get(request.payment_id.as_bytes())? {
                    let mut existing: TransferRecord = decode(&existing);
                    // Expired already: a voided attempt may no longer confirm it later.
                    if existing.expired_holders.contains(&request.code_nonce) {
                        existing
                            .expired_holders
                            .retain(|n| n != &request.code_nonce);
                        transfers.insert(request.payment_id.as_bytes(), encode(&existing))?;
                        nonces.insert(nonce_key.clone(), encode(&voided))?;
                        return Ok(false);
                    }
                    let mut holders = existing.holders();
                    let this_attempt = holders.contains(&request.code_nonce)
                        && existing.credit_account_id == store_id
                        && !existing.offline;
                    let voidable = this_attempt && !existing.voided && !existing.posted;
                    if voidable && holders.len() > 1 {
                        // Another attempt told "approved" still stands: nothing moves back.
                        holders.retain(|n| n != &request.code_nonce);
                        existing.approved_nonces = holders;
                        transfers.insert(request.payment_id.as_bytes(), encode(&existing))?;
                        nonces.insert(nonce_key.clone(), encode(&voided))?;
                        return Ok(false);
                    }
                    if voidable {
                        reverse_tx(
                            accounts,
                            transfers,
                            nonces,
                            pending,
                            &request.payment_id,
                            existing,
                            now_ms,
                        )?;
                        return Ok(true);
                    }
                    if this_attempt {
                        return Ok(false);
                    }
                }
                // The attempt never arrived (burn its nonce), or it was declined, or another
                // attempt holds the transfer: nothing moves back. A nonce that paid or joined a
                // transfer keeps its record.
                match nonces.get(&nonce_key)? {
                    None => {
                        nonces.insert(nonce_key.clone(), encode(&voided))?;
                    }
                    Some(seen) => {
                        let seen: NonceRecord = decode(&seen);
                        if seen.payment_id == request.payment_id
                            && matches!(seen.decision, Decision::Declined { .. })
                        {
                            nonces.insert(nonce_key.clone(), encode(&voided))?;
                        }
                    }
                }
                Ok(false)
            },
        ))?;
        self.flush()?;
        Ok(reversed)
    }

    /// What the ledger holds for one of `store_id`'s payments: paid for good (posted, applied from
    /// an offline approval, or charged again by a late post), pending (an attempt told
    /// "approved" may still be voided or expire, or confirm it after its expiry), or not paid. Read only: it burns no nonce and
    /// joins no transfer, so asking cannot move money.
    pub fn payment_status(
        &self,
        store_id: &str,
        payment_id: &str,
    ) -> Result<PaymentStatus, LedgerError> {
        protocol::check_store_payment(store_id, payment_id).map_err(invalid)?;
        let read = |id: String| -> Result<Option<TransferRecord>, LedgerError> {
            Ok(self
                .transfers
                .get(id.as_bytes())
                .map_err(|e| LedgerError::Storage(e.to_string()))?
                .map(|b| decode(&b)))
        };
        let paid = |t: TransferRecord| PaymentStatus::Paid {
            account_id: t.debit_account_id,
            amount_minor: t.amount_minor,
            currency: t.currency,
        };
        for suffix in ["offline", "posted"] {
            if let Some(t) = read(format!("{payment_id}#{suffix}"))? {
                return Ok(paid(t));
            }
        }
        Ok(match read(payment_id.to_owned())? {
            // Expired with attempts that may still confirm it (a post on its way charges it
            // again): not final either way.
            Some(t) if t.voided && !t.expired_holders.is_empty() => PaymentStatus::Pending,
            Some(t) if t.voided => PaymentStatus::NotPaid,
            Some(t) if t.posted || t.offline => paid(t),
            Some(_) => PaymentStatus::Pending,
            None => PaymentStatus::NotPaid,
        })
    }

    /// Posts a payment the hub approved with the cloud's answer and journaled: from now on no void
    /// or expiry moves it back. Returns false when it was no longer pending for this attempt (it
    /// expired, or every attempt told "approved" was voided first): the register heard
    /// "approved" and the money is not in the store's account, so the post is kept for the
    /// operator ([`Ledger::late_posts`]). Idempotent.
    pub fn post(
        &self,
        store_id: &str,
        request: &protocol::PostPayment,
    ) -> Result<bool, LedgerError> {
        let posted = self.post_one(store_id, request)?;
        self.flush()?;
        Ok(posted)
    }

    /// Posts a batch (at most [`protocol::POST_BATCH_MAX`]) with one flush; one result per post.
    pub fn post_batch(
        &self,
        store_id: &str,
        posts: &[protocol::PostPayment],
    ) -> Result<Vec<bool>, LedgerError> {
        if posts.len() > protocol::POST_BATCH_MAX {
            return Err(LedgerError::Invalid(format!(
                "at most {} posts per batch",
                protocol::POST_BATCH_MAX
            )));
        }
        let posted = posts
            .iter()
            .map(|post| self.post_one(store_id, post))
            .collect::<Result<Vec<bool>, _>>()?;
        self.flush()?;
        Ok(posted)
    }

    fn post_one(
        &self,
        store_id: &str,
        request: &protocol::PostPayment,
    ) -> Result<bool, LedgerError> {
        // A store confirms only its own payments.
        request.check_from(store_id).map_err(invalid)?;
        let now_ms = self.clock.now_ms();
        let late_key = format!("{store_id}/{}", request.payment_id);
        let trees = (
            &self.transfers,
            &self.pending,
            &self.late_posts,
            &self.accounts,
            &self.grants,
            &self.grants_by_account,
            &self.debts,
            &self.nonces,
        );
        let posted =
            unwrap_tx(
                trees.transaction(
                    |(
                        transfers,
                        pending,
                        late_posts,
                        accounts,
                        grants,
                        by_account,
                        debts,
                        nonces,
                    )|
                     -> TxResult<bool> {
                        let existing: Option<TransferRecord> = transfers
                            .get(request.payment_id.as_bytes())?
                            .map(|b| decode(&b));
                        match existing {
                            // It expired before this confirmation came (the hub was cut off longer than
                            // the deadline): the store was promised the money, so it is charged now,
                            // once, as `<payment id>#posted`, into debt if need be.
                            Some(t)
                                if t.credit_account_id == store_id
                                    && t.voided
                                    && t.expired_holders.contains(&request.code_nonce) =>
                            {
                                let posted_id = format!("{}#posted", request.payment_id);
                                // Charged again already (this post, or an offline approval): never twice.
                                if let Some(again) = charged_again(transfers, &request.payment_id)?
                                {
                                    if again.debit_account_id == t.debit_account_id
                                        && again.amount_minor == t.amount_minor
                                    {
                                        return Ok(true);
                                    }
                                    let late = LatePost {
                                        store_id: store_id.into(),
                                        post: request.clone(),
                                        recorded_at_ms: now_ms,
                                    };
                                    late_posts.insert(late_key.as_bytes(), encode(&late))?;
                                    return Ok(false);
                                }
                                // The posting attempt's code answers "approved" again.
                                let record = NonceRecord {
                                    payment_id: request.payment_id.clone(),
                                    decision: Decision::Approved {
                                        account_id: t.debit_account_id.clone(),
                                        already_paid: false,
                                    },
                                    amount: Some((t.amount_minor, t.currency)),
                                };
                                nonces.insert(
                                    nonce_key(&t.debit_account_id, &request.code_nonce),
                                    encode(&record),
                                )?;
                                let mut customer: AccountRecord = decode(
                                    &accounts
                                        .get(t.debit_account_id.as_bytes())?
                                        .expect("debited account exists"),
                                );
                                let mut merchant: AccountRecord = decode(
                                    &accounts
                                        .get(store_id.as_bytes())?
                                        .expect("credited account exists"),
                                );
                                offline::apply_promised(
                                    (accounts, grants, by_account, debts),
                                    (&t.debit_account_id, &mut customer),
                                    (store_id, &mut merchant),
                                    t.amount_minor,
                                )?;
                                let charged = TransferRecord {
                                    applied_at_ms: now_ms,
                                    voided: false,
                                    posted: true,
                                    pending_until_ms: None,
                                    expired_holders: Vec::new(),
                                    approved_nonces: vec![request.code_nonce.clone()],
                                    ..t
                                };
                                transfers.insert(posted_id.as_bytes(), encode(&charged))?;
                                Ok(true)
                            }
                            Some(t)
                                if t.credit_account_id == store_id && (t.posted || t.offline) =>
                            {
                                Ok(true)
                            }
                            Some(mut t)
                                if t.credit_account_id == store_id
                                    && !t.voided
                                    && t.holders().contains(&request.code_nonce) =>
                            {
                                if let Some(deadline) = t.pending_until_ms.take() {
                                    pending.remove(pending_key(deadline, &request.payment_id))?;
                                }
                                t.posted = true;
                                transfers.insert(request.payment_id.as_bytes(), encode(&t))?;
                                Ok(true)
                            }
                            _ => {
                                let late = LatePost {
                                    store_id: store_id.into(),
                                    post: request.clone(),
                                    recorded_at_ms: now_ms,
                                };
                                late_posts.insert(late_key.as_bytes(), encode(&late))?;
                                Ok(false)
                            }
                        }
                    },
                ),
            )?;
        if !posted {
            tracing::error!(
                store_id,
                payment_id = %request.payment_id,
                "a post came after its payment expired or was voided; kept for the operator"
            );
        }
        Ok(posted)
    }

    /// Posts that came after their payment expired or was voided.
    pub fn late_posts(&self) -> Result<Vec<LatePost>, LedgerError> {
        read_all(&self.late_posts)
    }

    /// Moves back every pending payment whose deadline passed (its hub never confirmed it: it died
    /// or lost its disk with the attempt). Returns how many.
    pub fn expire_pending(&self) -> Result<usize, LedgerError> {
        let now_ms = self.clock.now_ms();
        let due: Vec<(Vec<u8>, String)> = self
            .pending
            .range(..now_ms.saturating_add(1).to_be_bytes().to_vec())
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), String::from_utf8_lossy(&v).into_owned()))
                    .map_err(|e| LedgerError::Storage(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let mut expired = 0;
        for (key, payment_id) in due {
            let trees = (&self.accounts, &self.transfers, &self.nonces, &self.pending);
            let moved = unwrap_tx(trees.transaction(
                |(accounts, transfers, nonces, pending)| -> TxResult<bool> {
                    // Decided from what the transaction reads, not from the scan: since the
                    // scan, another writer (another instance, an attempt joining the payment)
                    // may have moved the deadline on.
                    if pending.remove(key.clone())?.is_none() {
                        return Ok(false);
                    }
                    let Some(existing) = transfers.get(payment_id.as_bytes())? else {
                        return Ok(false);
                    };
                    let mut existing: TransferRecord = decode(&existing);
                    if existing.voided || existing.posted || existing.offline {
                        return Ok(false);
                    }
                    if existing
                        .pending_until_ms
                        .is_some_and(|until| until > now_ms)
                    {
                        return Ok(false);
                    }
                    existing.expired_holders = existing.holders();
                    reverse_tx(
                        accounts,
                        transfers,
                        nonces,
                        pending,
                        &payment_id,
                        existing,
                        now_ms,
                    )?;
                    Ok(true)
                },
            ))?;
            if moved {
                tracing::warn!(
                    payment_id,
                    "pending payment expired unconfirmed; moved back"
                );
                expired += 1;
            }
        }
        if expired > 0 {
            self.flush()?;
        }
        Ok(expired)
    }
}

/// For a token issued by code and face: the decline when the code the face confirmed already
/// paid (or was presented for) another payment. A repeat of this payment passes.
fn confirmed_code_paid_elsewhere(
    nonces: &storage::kv::TransactionalTree,
    request: &CloudAuthorize,
) -> TxResult<Option<Decision>> {
    let Some(code) = &request.spent_code else {
        return Ok(None);
    };
    let Some(first) = nonces.get(nonce_key(&request.account_id, code))? else {
        return Ok(None);
    };
    let first: NonceRecord = decode(&first);
    Ok((first.payment_id != request.payment_id).then(|| {
        Decision::declined(
            DeclineReason::CodeReplayed,
            "the payment code this face confirmed was already used; show a fresh code",
        )
    }))
}

/// Burns the code a code-and-face token's face confirmed, with what its payment was answered: a
/// plain code payment with it at any store is then a replay.
fn burn_confirmed_code(
    nonces: &storage::kv::TransactionalTree,
    request: &CloudAuthorize,
    decision: &Decision,
) -> TxResult<()> {
    let Some(code) = &request.spent_code else {
        return Ok(());
    };
    let key = nonce_key(&request.account_id, code);
    if nonces.get(&key)?.is_none() {
        let record = NonceRecord {
            payment_id: request.payment_id.clone(),
            decision: decision.clone(),
            amount: Some((request.amount_minor, request.currency)),
        };
        nonces.insert(key, encode(&record))?;
    }
    Ok(())
}
