//! Who may talk to the proxy: `requirepass` for the default user, `[[users]]` for named
//! ones, checked in constant time.
//!
//! Passwords come from the config as a string, `{ env = "VAR" }` or `{ file = "path" }`
//! (see [`crate::config::Secret`]), resolved once at start-up. Owns the check and the
//! failure count; the connection owns whether a client is authenticated.

use crate::config::Config;
use std::sync::atomic::{AtomicU64, Ordering};

/// The users the proxy accepts, resolved from the config.
#[derive(Debug, Default)]
pub struct Users {
    /// (name, password); "default" is `requirepass`.
    users: Vec<(String, Vec<u8>)>,
    pub failures: AtomicU64,
}

pub const NOAUTH: &str = "NOAUTH Authentication required.";
pub const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

impl Users {
    pub fn from_config(c: &Config) -> Result<Users, String> {
        let mut users = Vec::new();
        if let Some(p) = &c.requirepass {
            users.push((
                "default".to_string(),
                p.resolve("requirepass")?.into_bytes(),
            ));
        }
        for u in &c.users {
            users.push((
                u.name.clone(),
                u.password
                    .resolve(&format!("users.{}.password", u.name))?
                    .into_bytes(),
            ));
        }
        Ok(Users {
            users,
            failures: AtomicU64::new(0),
        })
    }

    /// Whether clients must authenticate first.
    pub fn required(&self) -> bool {
        !self.users.is_empty()
    }

    /// Checks `user` (None: the default user) and `password`. Every configured user is
    /// compared, so the time taken does not tell which names exist.
    pub fn check(&self, user: Option<&[u8]>, password: &[u8]) -> bool {
        let user = user.unwrap_or(b"default");
        let mut ok = false;
        for (name, pw) in &self.users {
            let name_ok = constant_time_eq(name.as_bytes(), user);
            let pw_ok = constant_time_eq(pw, password);
            ok |= name_ok & pw_ok;
        }
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(user = %String::from_utf8_lossy(user), "authentication failed");
        }
        ok
    }
}

/// Compares without an early exit, so that timing does not tell how much of a guess was
/// right (the length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-124", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret", b"secret-token-123"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn users_from_config_check_name_and_password() {
        std::env::set_var("TALLY_TEST_PW", "from-env");
        let c = Config::from_toml_str(
            "requirepass = \"sesame\"\n[[users]]\nname = \"alice\"\npassword = { env = \"TALLY_TEST_PW\" }\n",
        )
        .unwrap();
        let u = Users::from_config(&c).unwrap();
        assert!(u.required());
        assert!(u.check(None, b"sesame"));
        assert!(u.check(Some(b"default"), b"sesame"));
        assert!(u.check(Some(b"alice"), b"from-env"));
        assert!(!u.check(Some(b"alice"), b"sesame"));
        assert!(!u.check(Some(b"bob"), b"from-env"));
        assert_eq!(u.failures.load(Ordering::Relaxed), 2);
        assert!(!Users::from_config(&Config::default()).unwrap().required());
    }
}
