//! Layered configuration for every facepay binary, with figment.
//!
//! Precedence, lowest to highest: the binary's built-in defaults, its TOML file, environment
//! variables with its prefix (`FACEPAY_EDGE_`, nested keys joined by `__`), then `--set key=value`
//! overrides from the command line. Unknown keys and invalid values are refused with a message that
//! names the key and where it came from; binaries exit with [`EXIT_CONFIG`] before binding anything.

use std::path::{Path, PathBuf};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

/// Exit status for a configuration error (BSD `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file named on the command line does not exist or cannot be read.
    #[error("config file {path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A `--set` argument that is not `key=value`.
    #[error("command-line override {0:?} is not key=value")]
    Override(String),
    /// A key that is unknown or whose value has the wrong type.
    #[error("{0}")]
    Invalid(String),
}

/// A configuration that can check itself after loading: ranges, cross-field rules.
pub trait Validate {
    /// Returns the first offending key and why, e.g. `("scan_timeout_ms", "must be at least 100")`.
    fn validate(&self) -> Result<(), (String, String)>;
}

/// Where a binary's configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// `key=value` overrides, highest precedence.
    pub overrides: Vec<String>,
}

/// Loads a configuration: defaults < file < environment (`env_prefix`) < overrides, then validates.
pub fn load<T>(env_prefix: &str, sources: &Sources) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default + Validate,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = &sources.file {
        check_readable(path)?;
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Env::prefixed(env_prefix).split("__"));
    for item in &sources.overrides {
        let (key, value) = item
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| ConfigError::Override(item.clone()))?;
        figment = figment.merge(Serialized::global(key.trim(), parse_value(value)));
    }
    let config: T = figment
        .extract()
        .map_err(|e| ConfigError::Invalid(describe(e)))?;
    if let Err((key, why)) = config.validate() {
        let origin = sources
            .file
            .as_ref()
            .map(|p| {
                format!(
                    " (file {}, or its environment and command-line overrides)",
                    p.display()
                )
            })
            .unwrap_or_default();
        return Err(ConfigError::Invalid(format!(
            "invalid value for key `{key}`{origin}: {why}"
        )));
    }
    Ok(config)
}

fn check_readable(path: &Path) -> Result<(), ConfigError> {
    std::fs::read_to_string(path)
        .map(|_| ())
        .map_err(|e| ConfigError::File {
            path: path.to_owned(),
            detail: e.to_string(),
        })
}

/// A command-line value is read as TOML when it parses (numbers, booleans, arrays), else as text.
fn parse_value(value: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()))
}

fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let origin = match &e.metadata {
                Some(meta) => match &meta.source {
                    Some(source) => format!("{} {source}", meta.name),
                    None => meta.name.to_string(),
                },
                None => "configuration".to_string(),
            };
            let key = if key.is_empty() {
                String::new()
            } else {
                format!(" key `{key}`:")
            };
            format!("{origin}:{key} {}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The command-line arguments every facepay binary takes for its configuration.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file (see configs/ for a documented one).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one key, highest precedence: `--set mqtt.port=1884` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// How logs are written to stderr: `text` for people, `json` for a log pipeline (one object
    /// per line: timestamp, level, target, fields).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Check the configuration (file, environment and `--set` together) and exit: 0 when it is
    /// valid, [`EXIT_CONFIG`] and why when not. Nothing is opened, bound or written.
    #[arg(long)]
    pub check_config: bool,
}

/// How a binary writes its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl ConfigArgs {
    /// The sources these arguments name.
    pub fn sources(&self) -> Sources {
        Sources {
            file: self.config.clone(),
            overrides: self.overrides.clone(),
        }
    }
}

/// Loads a binary's configuration or exits with [`EXIT_CONFIG`], printing why, before the binary
/// has bound any socket. With `--check-config`, exits either way: 0 once it is found valid.
pub fn load_or_exit<T>(binary: &str, env_prefix: &str, args: &ConfigArgs) -> T
where
    T: DeserializeOwned + Serialize + Default + Validate,
{
    match load(env_prefix, &args.sources()) {
        Ok(_) if args.check_config => {
            let file = args
                .config
                .as_ref()
                .map_or("no file".to_owned(), |f| f.display().to_string());
            println!(
                "{binary}: configuration is valid ({file}, {} override(s), {env_prefix}* \
                 environment)",
                args.overrides.len()
            );
            std::process::exit(0);
        }
        Ok(config) => config,
        Err(error) => {
            eprintln!("{binary}: configuration error: {error}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// Checks that `value` is a socket address such as `127.0.0.1:9300` (port 0 picks a free port).
pub fn check_socket_addr(key: &str, value: &str) -> Result<(), (String, String)> {
    value
        .parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| {
            (
                key.to_owned(),
                format!("{value:?} is not an address:port such as 127.0.0.1:9300"),
            )
        })
}

/// Checks that a number lies in a range, naming the key and the unit otherwise.
pub fn check_range(
    key: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
    unit: &str,
) -> Result<(), (String, String)> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err((
            key.to_owned(),
            format!(
                "must be from {} to {} {unit}, got {value}",
                range.start(),
                range.end()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        name: String,
        timeout_ms: u64,
        inner: Inner,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        port: u16,
    }

    impl Default for Demo {
        fn default() -> Self {
            Demo {
                name: "d".into(),
                timeout_ms: 100,
                inner: Inner::default(),
            }
        }
    }

    impl Default for Inner {
        fn default() -> Self {
            Inner { port: 1 }
        }
    }

    impl Validate for Demo {
        fn validate(&self) -> Result<(), (String, String)> {
            if self.timeout_ms == 0 {
                return Err(("timeout_ms".into(), "must be positive".into()));
            }
            Ok(())
        }
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn layers_in_order() {
        let (_dir, path) = file("name = \"file\"\ntimeout_ms = 5\n[inner]\nport = 7\n");
        let sources = Sources {
            file: Some(path),
            overrides: vec!["inner.port=9".into()],
        };
        let c: Demo = load("FACEPAY_SETTINGS_TEST_A_", &sources).unwrap();
        assert_eq!(
            c,
            Demo {
                name: "file".into(),
                timeout_ms: 5,
                inner: Inner { port: 9 }
            }
        );
    }

    #[test]
    fn environment_beats_file() {
        let (_dir, path) = file("timeout_ms = 5\n");
        std::env::set_var("FACEPAY_SETTINGS_TEST_B_TIMEOUT_MS", "42");
        let sources = Sources {
            file: Some(path),
            overrides: vec![],
        };
        let c: Demo = load("FACEPAY_SETTINGS_TEST_B_", &sources).unwrap();
        assert_eq!(c.timeout_ms, 42);
    }

    #[test]
    fn typo_names_key_and_file() {
        let (_dir, path) = file("timeout_ms = 5\n[inner]\nprot = 7\n");
        let sources = Sources {
            file: Some(path.clone()),
            overrides: vec![],
        };
        let err = load::<Demo>("FACEPAY_SETTINGS_TEST_C_", &sources)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn wrong_type_names_key() {
        let (_dir, path) = file("timeout_ms = \"soon\"\n");
        let sources = Sources {
            file: Some(path.clone()),
            overrides: vec![],
        };
        let err = load::<Demo>("FACEPAY_SETTINGS_TEST_D_", &sources)
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeout_ms"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn validation_names_key() {
        let sources = Sources {
            file: None,
            overrides: vec!["timeout_ms=0".into()],
        };
        let err = load::<Demo>("FACEPAY_SETTINGS_TEST_E_", &sources)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`timeout_ms`") && err.contains("must be positive"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_and_bad_override() {
        let sources = Sources {
            file: Some("/nonexistent/x.toml".into()),
            overrides: vec![],
        };
        assert!(matches!(
            load::<Demo>("FACEPAY_SETTINGS_TEST_F_", &sources),
            Err(ConfigError::File { .. })
        ));
        let sources = Sources {
            file: None,
            overrides: vec!["novalue".into()],
        };
        assert!(matches!(
            load::<Demo>("FACEPAY_SETTINGS_TEST_F_", &sources),
            Err(ConfigError::Override(_))
        ));
    }
}
