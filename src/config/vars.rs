//! Reading `DEDUPD_*` variables. Each variable is declared once, where its part reads it: name,
//! default, one-line doc and parser in one call. The declarations are recorded as they are read,
//! so `dedupd --help`, the README's table and `dedupd config` all come from the same calls.

use std::collections::BTreeMap;

use super::{ConfigError, Secret};

/// The default of a variable, as the help and the README show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefaultValue {
    /// This value when the variable is unset.
    Value(String),
    /// Unset means something other than a value; the text says what.
    Unset(String),
}

/// One configuration variable: its name, default and meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Var {
    /// Full name, `DEDUPD_*`.
    pub name: &'static str,
    /// What applies when it is unset.
    pub default: DefaultValue,
    /// One line saying what it does.
    pub doc: String,
}

/// The variables set, and those declared so far with their effective values.
#[derive(Debug)]
pub struct Vars {
    /// The `DEDUPD_*` variables given, by name.
    set: BTreeMap<String, String>,
    /// Every variable read so far, in reading order.
    declared: Vec<Var>,
    /// What `dedupd config` prints for each declared variable (secrets masked).
    shown: Vec<Shown>,
}

/// A variable and its effective value as `dedupd config` prints it.
pub type Shown = (&'static str, String);

impl Vars {
    /// Reads from these `DEDUPD_*` values.
    pub(crate) fn new(set: BTreeMap<String, String>) -> Vars {
        Vars {
            set,
            declared: Vec::new(),
            shown: Vec::new(),
        }
    }

    /// The raw value of `name`, if set (for errors that name a second variable).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.set.get(name).map(String::as_str)
    }

    /// Declares `name` with `default` and `doc`, and parses its value (`default` when unset);
    /// `parse` says the expected form on error.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the variable, the value and the expected form.
    pub fn var<T>(
        &mut self,
        name: &'static str,
        default: &str,
        doc: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        self.declare(name, DefaultValue::Value(default.into()), doc);
        let value = self.get(name).unwrap_or(default).to_string();
        self.shown.push((name, value.clone()));
        parse(&value).map_err(|expected| invalid(name, &value, expected))
    }

    /// Declares `name`, which may stay unset (`unset` says what that means), and parses its value
    /// if set.
    ///
    /// # Errors
    ///
    /// As [`Vars::var`].
    pub fn opt<T>(
        &mut self,
        name: &'static str,
        unset: &str,
        doc: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        self.declare(name, DefaultValue::Unset(unset.into()), doc);
        let value = self.get(name).map(str::to_string);
        self.shown
            .push((name, value.clone().unwrap_or_else(|| "(unset)".into())));
        match value {
            None => Ok(None),
            Some(v) => parse(&v)
                .map(Some)
                .map_err(|expected| invalid(name, &v, expected)),
        }
    }

    /// Declares a secret `name` and `file`, the variable naming a file that holds it instead (for
    /// systemd credentials; its content trimmed); never both. `dedupd config` shows it masked,
    /// and no error shows its value.
    ///
    /// # Errors
    ///
    /// Both set, an unreadable or empty file, or an empty value.
    pub fn secret(
        &mut self,
        name: &'static str,
        file: &'static str,
        default: DefaultValue,
        doc: &str,
        what: &str,
    ) -> Result<Option<Secret>, ConfigError> {
        self.declare(name, default, doc);
        self.declare(
            file,
            DefaultValue::Unset(format!("use `{name}`")),
            &format!("file holding {what} instead (systemd credentials); not with `{name}`"),
        );
        let secret = match (self.get(name), self.get(file)) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict {
                    var: file.into(),
                    other: name.into(),
                })
            }
            (_, Some(path)) => match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => Some(Secret::from(text.trim().to_string())),
                Ok(_) => {
                    return Err(invalid(
                        file,
                        path,
                        format!("a file holding {what} (it is empty)"),
                    ))
                }
                Err(e) => {
                    return Err(invalid(
                        file,
                        path,
                        format!("a readable file holding {what} ({e})"),
                    ))
                }
            },
            (Some(""), None) => return Err(invalid(name, "", format!("{what}, not empty"))),
            (value, None) => value.map(|v| Secret::from(v.to_string())),
        };
        let shown = if secret.is_some() { "***" } else { "(unset)" };
        self.shown.push((name, shown.into()));
        let path = self.get(file).unwrap_or("(unset)").to_string();
        self.shown.push((file, path));
        Ok(secret)
    }

    /// What `dedupd config` prints for `name`, declared already, instead of its value as given
    /// (a broker URL with its password masked).
    pub fn show(&mut self, name: &str, shown: String) {
        if let Some(entry) = self.shown.iter_mut().find(|(n, _)| *n == name) {
            entry.1 = shown;
        }
    }

    fn declare(&mut self, name: &'static str, default: DefaultValue, doc: &str) {
        debug_assert!(
            !self.declared.iter().any(|v| v.name == name),
            "{name} declared twice"
        );
        self.declared.push(Var {
            name,
            default,
            doc: doc.into(),
        });
    }

    /// The declared variables and their effective values, once everything is read.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Unknown`] for a `DEDUPD_*` variable nobody declared (a typo, most likely).
    pub(crate) fn finish(self) -> Result<(Vec<Var>, Vec<Shown>), ConfigError> {
        if let Some((var, value)) = self
            .set
            .iter()
            .find(|(name, _)| !self.declared.iter().any(|v| v.name == *name))
        {
            return Err(ConfigError::Unknown {
                var: var.clone(),
                value: value.clone(),
            });
        }
        Ok((self.declared, self.shown))
    }
}

/// The error for `name=value`, with what would have been accepted.
pub(crate) fn invalid(name: &str, value: &str, expected: String) -> ConfigError {
    ConfigError::Invalid {
        var: name.into(),
        value: value.into(),
        expected,
    }
}
