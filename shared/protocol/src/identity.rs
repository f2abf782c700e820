//! Face payment messages: the cash register's verify API, edge -> hub verification, hub <-> cloud
//! identification and template distribution, and the enrollment API.

use serde::{Deserialize, Serialize};

use crate::{AccountId, DeclineReason, StoreId, TerminalId};

/// Length of an SFace embedding.
pub const EMBEDDING_LEN: usize = 128;

/// Which second factor a customer chose at enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecondFactorKind {
    /// The customer's PIN (4 to 8 digits).
    Pin,
    /// The last four digits of the customer's phone number.
    PhoneLast4,
}

impl SecondFactorKind {
    /// The stable snake_case code.
    pub fn as_str(&self) -> &'static str {
        match self {
            SecondFactorKind::Pin => "pin",
            SecondFactorKind::PhoneLast4 => "phone_last4",
        }
    }
}

/// Checks that an embedding has the right length, finite values and unit norm (within rounding).
pub fn validate_embedding(embedding: &[f32]) -> Result<(), String> {
    if embedding.len() != EMBEDDING_LEN {
        return Err(format!(
            "embedding has {} values, expected {EMBEDDING_LEN}",
            embedding.len()
        ));
    }
    if embedding.iter().any(|v| !v.is_finite()) {
        return Err("embedding has a non-finite value".into());
    }
    let norm: f32 = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
    if !(0.99..=1.01).contains(&norm) {
        return Err(format!("embedding is not L2-normalised (norm {norm:.3})"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Cash register -> edge
// ---------------------------------------------------------------------------------------------

/// How the customer proves who they are at `POST /v1/verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMethod {
    /// The camera identifies the customer among the enrolled (1:N).
    Face,
    /// The QR code names the account; the camera confirms the payer is its owner (1:1).
    CodeAndFace,
}

/// `POST /v1/verify`: identify the customer at the terminal and get a payment token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyStart {
    /// Face only, or code and face.
    pub method: VerifyMethod,
}

/// `POST /v1/verify/second-factor`: answer the challenge a verification asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondFactorAnswer {
    /// The challenge id from the `second_factor_required` answer.
    pub challenge_id: String,
    /// The digits the customer typed.
    pub value: String,
}

// ---------------------------------------------------------------------------------------------
// Edge -> hub (Zenoh query/reply on the verify key)
// ---------------------------------------------------------------------------------------------

/// An edge asks its hub to verify a customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyRequest {
    /// The store.
    pub store_id: StoreId,
    /// The terminal; the token is bound to it.
    pub terminal_id: TerminalId,
    /// What is verified.
    pub body: VerifyBody,
}

/// What an edge asks to verify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VerifyBody {
    /// Identify this face among the enrolled.
    Face {
        /// The live face's embedding.
        embedding: Vec<f32>,
    },
    /// Confirm this face belongs to the account the payment code names.
    CodeAndFace {
        /// The payment code text.
        code: String,
        /// The live face's embedding.
        embedding: Vec<f32>,
    },
    /// The customer's answer to a second-factor challenge.
    SecondFactor(SecondFactorAnswer),
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum VerifyReply {
    /// The payer is known: a single-use token to charge with.
    Verified {
        /// The payment token: spend it with `POST /v1/charge`.
        token: String,
        /// The account it charges.
        account_id: AccountId,
        /// When the token stops being accepted (milliseconds since the Unix epoch).
        expires_at_ms: u64,
    },
    /// Two enrolled faces are close, or the match is in the grey zone: ask the customer.
    SecondFactorRequired {
        /// Answer with this id.
        challenge_id: String,
        /// What to ask for.
        kind: SecondFactorKind,
        /// When the challenge stops being accepted.
        expires_at_ms: u64,
    },
    /// Not verified.
    Refused {
        /// Why.
        reason: DeclineReason,
        /// Human-readable detail.
        detail: String,
    },
}

impl VerifyReply {
    /// A refusal.
    pub fn refused(reason: DeclineReason, detail: impl Into<String>) -> Self {
        VerifyReply::Refused {
            reason,
            detail: detail.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hub <-> cloud
// ---------------------------------------------------------------------------------------------

/// A hub asks the cloud about a face its hot set does not hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudIdentify {
    /// The live face's embedding.
    pub embedding: Vec<f32>,
    /// For a 1:1 check: the account whose templates to return. `None` searches everyone (1:N).
    pub account_id: Option<AccountId>,
}

/// The cloud's answer to a [`CloudIdentify`]: the best-scoring accounts' hot-set entries, so the
/// hub decides with its own rule and caches them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudIdentified {
    /// Up to two accounts, best first (1:N), or the named account (1:1); empty when none.
    pub candidates: Vec<HotEntry>,
}

/// One customer's face templates and second factor, as a hub keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HotEntry {
    /// The customer's account.
    pub account_id: AccountId,
    /// The store the customer enrolled at.
    pub home_store_id: StoreId,
    /// Template id and L2-normalised embedding of each enrolled photo.
    pub templates: Vec<(u64, Vec<f32>)>,
    /// Which second factor to ask.
    pub second_factor: SecondFactorKind,
    /// Argon2id PHC string of the second factor.
    pub second_factor_hash: String,
    /// The version of the customer's latest change in the cloud's change log (0: not known): a
    /// hub caches an entry from a search answer only when no newer change of the account (an
    /// erasure) reached it meanwhile.
    #[serde(default)]
    pub version: u64,
}

/// Consecutive wrong second factors of an account and the lock they caused. Counted across the
/// fleet by the cloud, which broadcasts each change; a hub counts alone while it cannot reach
/// the cloud.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lockout {
    /// Consecutive wrong answers.
    pub failures: u32,
    /// Face payment refused until then (ms since the epoch); 0 when not locked.
    pub locked_until_ms: u64,
    /// The version of the cloud's state this is, or builds on (0: counted by a hub alone); a hub
    /// takes a cloud state only when newer than the one it holds.
    #[serde(default)]
    pub version: u64,
    /// How many times the cloud started the count again (a right answer): a hub replaces what
    /// it counted when this grows, and otherwise keeps the larger count.
    #[serde(default)]
    pub resets: u64,
}

/// The lockout policy (FIDO's rule of thumb): `free` failures, then a lock that doubles with each
/// further failure, from `base_ms` up to `max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Failures allowed before the first lock.
    pub free: u32,
    /// First lock.
    pub base_ms: u64,
    /// Longest lock.
    pub max_ms: u64,
}

impl LockoutPolicy {
    /// The state after one more failure at `now_ms`.
    pub fn fail(&self, state: Lockout, now_ms: u64) -> Lockout {
        let failures = state.failures.saturating_add(1);
        let locked_until_ms = if failures > self.free {
            let doublings = (failures - self.free - 1).min(32);
            let lock = self
                .base_ms
                .saturating_mul(1u64 << doublings)
                .min(self.max_ms);
            now_ms.saturating_add(lock)
        } else {
            0
        };
        Lockout {
            failures,
            locked_until_ms,
            ..state
        }
    }
}

/// What a hub tells the cloud after checking a second-factor answer: the accounts a wrong answer
/// counts against (every candidate of its challenge), or the one a right answer matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactorReport {
    /// Accounts a wrong answer counts against.
    pub failed: Vec<AccountId>,
    /// The account a right answer matched (its count starts again).
    pub passed: Option<AccountId>,
}

/// Lockout states the cloud holds after a change, for every hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockoutBatch {
    /// Each account's state.
    pub entries: Vec<(AccountId, Lockout)>,
}

/// One change of the template distribution log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TemplateChange {
    /// A customer's current entry (added or changed).
    Upsert(HotEntry),
    /// The customer was erased: drop every template of the account.
    Revoke {
        /// The erased account.
        account_id: AccountId,
    },
}

/// A versioned template change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateUpdate {
    /// Cloud-wide monotone version.
    pub version: u64,
    /// The change.
    pub change: TemplateChange,
}

/// A batch of template changes, sent on request and pushed on every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateBatch {
    /// Changes in version order.
    pub updates: Vec<TemplateUpdate>,
    /// Highest version the batch covers (also when it skips other stores' changes).
    pub up_to_version: u64,
    /// True when more changes follow.
    pub more: bool,
}

// ---------------------------------------------------------------------------------------------
// Enrollment API (cloud, HTTPS)
// ---------------------------------------------------------------------------------------------

/// `POST /v1/customers`: enroll a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCustomer {
    /// The customer's account id.
    pub customer_id: String,
    /// Full name.
    pub name: String,
    /// Phone number, digits with an optional leading `+`, spaces allowed.
    pub phone: String,
    /// PIN, 4 to 8 digits; stored only as a salted Argon2id hash.
    pub pin: String,
    /// Which second factor to ask when a face match is not conclusive.
    pub second_factor: SecondFactorKind,
    /// The store the customer enrolls at: its hub holds the templates.
    pub home_store_id: StoreId,
    /// Account currency.
    pub currency: String,
    /// Opening balance in minor units.
    #[serde(default)]
    pub initial_balance_minor: i64,
    /// Wallet public key for code payments (base64url), optional.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// `POST /v1/customers/{id}/faces`: add an enrollment photo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddFace {
    /// The photo (JPEG, PNG or WebP), base64.
    pub image_base64: String,
    /// Accounts an operator has confirmed are other people who look alike (twins): a close match
    /// to them is not a duplicate. Payments then ask those accounts for the second factor.
    #[serde(default)]
    pub confirmed_look_alike_of: Vec<String>,
}

/// A customer as the enrollment API reports them (no secrets, no templates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerView {
    /// Account id.
    pub customer_id: String,
    /// Name.
    pub name: String,
    /// Phone, masked but for the last four digits.
    pub phone_masked: String,
    /// The second factor asked.
    pub second_factor: SecondFactorKind,
    /// Home store.
    pub home_store_id: StoreId,
    /// Number of enrolled face templates.
    pub faces: usize,
}

/// The answer to adding a face.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaceAdded {
    /// The new template's id.
    pub template_id: u64,
    /// Liveness score of the photo.
    pub liveness: f32,
    /// Templates the customer now has.
    pub faces: usize,
}

/// Synthetic face embeddings for benchmarks and tests: random unit vectors as enrolled templates,
/// and noisy copies of them as new photos of the same person.
pub mod synthetic {
    use super::EMBEDDING_LEN;

    /// A small deterministic generator (xorshift64*), so results replay from a seed.
    pub struct Rng(u64);

    impl Rng {
        /// A generator from a seed.
        pub fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        /// The next 64 random bits.
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// Uniform in `0..n` (`n` > 0).
        pub fn below(&mut self, n: u64) -> u64 {
            (self.next_u64() >> 16) % n
        }

        /// Uniform in [0, 1).
        pub fn uniform(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
        }

        /// Standard normal (Box-Muller).
        pub fn normal(&mut self) -> f32 {
            let u1 = self.uniform().max(1e-7);
            let u2 = self.uniform();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        }
    }

    fn normalise(mut v: Vec<f32>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= n);
        v
    }

    /// A random unit vector (an enrolled template).
    pub fn template(rng: &mut Rng) -> Vec<f32> {
        normalise((0..EMBEDDING_LEN).map(|_| rng.normal()).collect())
    }

    /// Another photo of the same person: the template plus noise, scaled so that the expected
    /// cosine with the template is `cosine` (0.7 is typical of two photos of one person).
    pub fn probe(rng: &mut Rng, template: &[f32], cosine: f32) -> Vec<f32> {
        let sigma = (1.0 / (cosine * cosine) - 1.0).sqrt() / (EMBEDDING_LEN as f32).sqrt();
        normalise(template.iter().map(|t| t + sigma * rng.normal()).collect())
    }

    /// A Gaussian fitted to real embeddings: their mean and full covariance. Vectors drawn from
    /// it (then normalised) stand in for people nobody photographed: they share the real
    /// embeddings' mean direction and their spread along each principal direction, so a search
    /// finds them as close to a real probe as other real faces are. Uniform random vectors are
    /// not like faces: they all sit near 90 degrees from every real embedding.
    #[derive(Debug, Clone)]
    pub struct FaceModel {
        dim: usize,
        mean: Vec<f64>,
        /// Lower-triangular Cholesky factor of the covariance, row-major `dim` x `dim`.
        factor: Vec<f64>,
    }

    impl FaceModel {
        /// Fits the model to `samples` (one embedding per person: a distractor is another
        /// person). Needs more samples than dimensions.
        pub fn fit(samples: &[Vec<f32>]) -> Result<Self, String> {
            let dim = samples.first().map(Vec::len).ok_or("no samples to fit")?;
            if samples.len() <= dim {
                return Err(format!(
                    "{} samples cannot fit a covariance of {dim} dimensions",
                    samples.len()
                ));
            }
            if samples.iter().any(|s| s.len() != dim) {
                return Err("samples of different lengths".into());
            }
            let n = samples.len() as f64;
            let mut mean = vec![0.0f64; dim];
            for s in samples {
                for (m, v) in mean.iter_mut().zip(s) {
                    *m += *v as f64 / n;
                }
            }
            let mut cov = vec![0.0f64; dim * dim];
            for s in samples {
                let d: Vec<f64> = s.iter().zip(&mean).map(|(v, m)| *v as f64 - m).collect();
                for i in 0..dim {
                    for j in 0..=i {
                        cov[i * dim + j] += d[i] * d[j] / (n - 1.0);
                    }
                }
            }
            // A small ridge keeps the factor defined when the samples span fewer directions.
            let ridge = 1e-9 + 1e-6 * (0..dim).map(|i| cov[i * dim + i]).sum::<f64>() / dim as f64;
            let mut factor = vec![0.0f64; dim * dim];
            for i in 0..dim {
                for j in 0..=i {
                    let mut sum = cov[i * dim + j];
                    for k in 0..j {
                        sum -= factor[i * dim + k] * factor[j * dim + k];
                    }
                    factor[i * dim + j] = if i == j {
                        (sum + ridge).max(f64::MIN_POSITIVE).sqrt()
                    } else {
                        sum / factor[j * dim + j]
                    };
                }
            }
            Ok(FaceModel { dim, mean, factor })
        }

        /// One unit vector drawn from the model.
        pub fn sample(&self, rng: &mut Rng) -> Vec<f32> {
            let z: Vec<f64> = (0..self.dim).map(|_| rng.normal() as f64).collect();
            let v = (0..self.dim)
                .map(|i| {
                    let row = &self.factor[i * self.dim..i * self.dim + i + 1];
                    (self.mean[i] + row.iter().zip(&z).map(|(f, z)| f * z).sum::<f64>()) as f32
                })
                .collect();
            normalise(v)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn dot(x: &[f32], y: &[f32]) -> f32 {
            x.iter().zip(y).map(|(p, q)| p * q).sum()
        }

        /// Mean cosine between consecutive pairs of a set.
        fn mean_pair_cosine(set: &[Vec<f32>]) -> f32 {
            set.chunks(2).map(|p| dot(&p[0], &p[1])).sum::<f32>() / (set.len() / 2) as f32
        }

        #[test]
        fn a_fitted_model_draws_vectors_spread_like_its_samples_not_uniformly() {
            // "Real" embeddings: a shared mean direction and most spread along a few axes, as
            // face embeddings have (pairs of different people at cosine ~0.3, not ~0).
            let mut rng = Rng::new(11);
            let real: Vec<Vec<f32>> = (0..4000)
                .map(|_| {
                    let v: Vec<f32> = (0..EMBEDDING_LEN)
                        .map(|i| {
                            let spread = if i < 8 { 1.0 } else { 0.15 };
                            (if i == 0 { 2.0 } else { 0.0 }) + spread * rng.normal()
                        })
                        .collect();
                    normalise(v)
                })
                .collect();
            let model = FaceModel::fit(&real).unwrap();
            let drawn: Vec<Vec<f32>> = (0..4000).map(|_| model.sample(&mut rng)).collect();
            let uniform: Vec<Vec<f32>> = (0..4000).map(|_| template(&mut rng)).collect();
            let (r, d, u) = (
                mean_pair_cosine(&real),
                mean_pair_cosine(&drawn),
                mean_pair_cosine(&uniform),
            );
            assert!((d - r).abs() < 0.03, "drawn {d} vs real {r}");
            assert!(u.abs() < 0.02 && r > 0.2, "uniform {u} vs real {r}");
            // Spread per axis follows the samples': axis 1 wide, axis 100 narrow.
            let var = |set: &[Vec<f32>], axis: usize| {
                set.iter().map(|v| v[axis] * v[axis]).sum::<f32>() / set.len() as f32
            };
            let ratio = |set: &[Vec<f32>]| var(set, 1) / var(set, 100);
            assert!((ratio(&drawn) / ratio(&real) - 1.0).abs() < 0.25);
            assert!(drawn.iter().all(|v| (dot(v, v) - 1.0).abs() < 1e-4));
        }

        #[test]
        fn a_model_needs_more_samples_than_dimensions() {
            let mut rng = Rng::new(3);
            let few: Vec<Vec<f32>> = (0..EMBEDDING_LEN).map(|_| template(&mut rng)).collect();
            assert!(FaceModel::fit(&few).unwrap_err().contains("cannot fit"));
            assert!(FaceModel::fit(&[]).is_err());
            let mut ragged: Vec<Vec<f32>> = (0..200).map(|_| template(&mut rng)).collect();
            ragged[5].pop();
            assert!(FaceModel::fit(&ragged).is_err());
        }

        #[test]
        fn probes_have_the_asked_similarity_and_templates_are_unrelated() {
            let mut rng = Rng::new(7);
            let a = template(&mut rng);
            let b = template(&mut rng);
            let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
            assert!((dot(&a, &a) - 1.0).abs() < 1e-5);
            assert!(dot(&a, &b).abs() < 0.35);
            let mean: f32 = (0..200)
                .map(|_| dot(&a, &probe(&mut rng, &a, 0.7)))
                .sum::<f32>()
                / 200.0;
            assert!((mean - 0.7).abs() < 0.03, "{mean}");
        }
    }
}
