//! Where `lichen serve` takes its settings from: its flags, `LICHEN_*`
//! environment variables, and a config file (`--config FILE`), in that
//! order of precedence, then the built-in defaults.
//!
//! The file's keys are the flags' names with `_` for `-` (`max_upload_bytes
//! = 1048576`, `peer = ["a:7946", "b"]`), so every flag is a key and no key
//! can drift from its flag: the file's values become the flags' defaults
//! before the command line is parsed, each checked by the flag's own parser
//! first, so a bad value names the file and the key. Every flag also reads
//! `LICHEN_<FLAG>` (`LICHEN_MAX_UPLOAD_BYTES`), which clap puts above a
//! default and below the flag itself.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::{ArgAction, Command};

/// Flags that are not settings: they have no key and no variable.
const NOT_SETTINGS: &[&str] = &["help", "config"];

/// The environment variable of a flag: `LICHEN_` and its name.
pub fn env_name(long: &str) -> String {
    format!("LICHEN_{}", long.to_ascii_uppercase().replace('-', "_"))
}

/// The file key of a flag.
fn key_name(long: &str) -> String {
    long.replace('-', "_")
}

/// Gives every setting of `serve` its `LICHEN_*` variable (those that
/// declare one keep it).
pub fn with_env(serve: Command) -> Command {
    let settings: Vec<Setting> = settings(&serve).collect();
    settings
        .into_iter()
        .fold(serve, |serve, Setting { id, long, .. }| {
            serve.mut_arg(id, |arg| {
                // A repeatable flag's variable holds a comma-separated list.
                let arg = match arg.get_action() {
                    ArgAction::Append => arg.value_delimiter(','),
                    _ => arg,
                };
                if arg.get_env().is_some() {
                    arg
                } else {
                    arg.env(env_name(&long))
                }
            })
        })
}

/// The config file named by the command line (`--config FILE`,
/// `--config=FILE`) or `LICHEN_CONFIG`, read before clap parses anything.
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(env_name("config")).map(PathBuf::from)
}

/// Makes the values of the config file at `path` the defaults of `serve`'s
/// flags. Errors name the file and the key.
pub fn with_file(serve: Command, path: &Path) -> anyhow::Result<Command> {
    let shown = path.display().to_string();
    let fail = |message: String| anyhow::anyhow!("{shown}: {message}");
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| fail(e.to_string().trim_end().to_string()))?;
    let known: Vec<Setting> = settings(&serve).collect();
    let mut serve = serve;
    for (key, value) in table {
        let Some(setting) = known.iter().find(|s| key_name(&s.long) == key) else {
            let shown: Vec<String> = known
                .iter()
                .filter(|s| !s.hidden)
                .map(|s| key_name(&s.long))
                .collect();
            return Err(fail(format!(
                "unknown key `{key}`; the keys are the flags of `lichen serve`: {}",
                shown.join(", ")
            )));
        };
        let values = values_of(&serve, &setting.id, &key, &value).map_err(fail)?;
        serve = serve.mut_arg(&setting.id, |arg| arg.default_values(values));
    }
    Ok(serve)
}

/// A flag of `serve` that is a setting.
struct Setting {
    /// clap's id of the argument (the field's name).
    id: String,
    long: String,
    /// Left out of `--help`, and of the keys an error lists.
    hidden: bool,
}

/// The settings of `serve`, in the order `--help` shows them.
fn settings(serve: &Command) -> impl Iterator<Item = Setting> + '_ {
    serve.get_arguments().filter_map(|arg| {
        let long = arg.get_long()?;
        (!NOT_SETTINGS.contains(&long)).then(|| Setting {
            id: arg.get_id().to_string(),
            long: long.to_string(),
            hidden: arg.is_hide_set(),
        })
    })
}

/// The value(s) of `key` as the flag's default values, each checked by the
/// flag's parser.
fn values_of(
    serve: &Command,
    id: &str,
    key: &str,
    value: &toml::Value,
) -> Result<Vec<String>, String> {
    let Some(arg) = serve.get_arguments().find(|a| a.get_id() == id) else {
        return Err(format!("unknown key `{key}`"));
    };
    let scalar = |value: &toml::Value| match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "`{key}` is a {}; expected a string, a whole number or a boolean",
            other.type_str()
        )),
    };
    let values = match (value, arg.get_action()) {
        (toml::Value::Array(items), ArgAction::Append) => {
            items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?
        }
        (toml::Value::Array(_), _) => {
            return Err(format!("`{key}` takes one value, not a list"));
        }
        (value, ArgAction::SetTrue) if !value.is_bool() => {
            return Err(format!("`{key}` is true or false"));
        }
        (value, _) => vec![scalar(value)?],
    };
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return Ok(values);
    }
    let flag = format!("--{}", arg.get_long().unwrap_or(id));
    for value in &values {
        // The flag's own parser, through clap: `serve` given just this flag.
        // Only a bad value counts here; what other flags it needs is
        // checked when the real command line is parsed.
        let parsed = serve
            .clone()
            .no_binary_name(true)
            .try_get_matches_from([flag.as_str(), value.as_str()]);
        if let Err(error) = parsed
            && matches!(
                error.kind(),
                ErrorKind::InvalidValue | ErrorKind::ValueValidation
            )
        {
            // clap's message up to its usage hint, on one line.
            let error = error.to_string();
            let why: Vec<&str> = error
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            let why = why.join(" ");
            return Err(format!("`{key}`: {}", why.trim_start_matches("error: ")));
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_path_comes_from_the_command_line_first() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_path(&args(&["lichen", "serve", "--config", "a.toml"])),
            Some(PathBuf::from("a.toml"))
        );
        assert_eq!(
            config_path(&args(&["lichen", "serve", "--config=b.toml"])),
            Some(PathBuf::from("b.toml"))
        );
        assert_eq!(env_name("max-upload-bytes"), "LICHEN_MAX_UPLOAD_BYTES");
        assert_eq!(key_name("max-upload-bytes"), "max_upload_bytes");
    }
}
