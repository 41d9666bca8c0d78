//! Linux: a systemd user unit in `~/.config/systemd/user`, logging to the journal.

use std::path::{Path, PathBuf};

use super::ServiceSpec;

pub const UNIT: &str = "egpud.service";
/// Seconds systemd waits before starting egpud again after it died.
pub const RESTART_SECONDS: u64 = 2;

/// `$XDG_CONFIG_HOME/systemd/user/egpud.service`.
pub fn unit_path(config_home: &Path) -> PathBuf {
    config_home.join("systemd/user").join(UNIT)
}

/// The unit file's text.
pub fn unit(spec: &ServiceSpec) -> String {
    let mut exec = quote(&spec.egpud.display().to_string());
    for arg in &spec.args {
        exec.push(' ');
        exec.push_str(&quote(arg));
    }
    let env: String = spec
        .environment()
        .iter()
        .map(|(name, value)| format!("Environment={}\n", quote(&format!("{name}={value}"))))
        .collect();
    format!(
        "[Unit]\n\
         Description=egpu daemon: keeps ML models resident and serves them on a Unix socket\n\
         # Give up after 5 crashes in 60 s instead of restarting forever.\n\
         StartLimitIntervalSec=60\n\
         StartLimitBurst=5\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ExecStart={exec}\n\
         # Started again when it dies (crash, kill -9), not after a clean exit (SIGTERM).\n\
         Restart=on-failure\n\
         RestartSec={RESTART_SECONDS}\n\
         {env}\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
    )
}

/// Quotes one word of a unit setting when it needs it (systemd's own quoting: double quotes
/// with backslash escapes), and escapes `%` specifiers and `$` expansions.
fn quote(word: &str) -> String {
    let escaped = word.replace('%', "%%").replace('$', "$$");
    if !escaped.is_empty()
        && !escaped
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\' | ';'))
    {
        return escaped;
    }
    let mut out = String::from("\"");
    for c in escaped.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            // systemd unescapes C-style escapes in quoted words; a raw newline would end
            // the line (and let a value add settings of its own).
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32 & 0xff)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newline_in_a_value_cannot_add_a_line() {
        let spec = ServiceSpec {
            egpud: "/usr/bin/egpud".into(),
            args: vec!["--x\nExecStartPre=/bin/evil".into()],
            path_env: "/usr/bin".into(),
            home: "/home/ada".into(),
            env: vec![(
                "A".into(),
                "1\n[Service]\nExecStartPre=/bin/evil\u{1b}".into(),
            )],
        };
        let text = unit(&spec);
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("ExecStartPre") || l == "[Service]\\n"),
            "{text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("[Service]")).count(),
            1
        );
        assert!(text.contains("\\nExecStartPre=/bin/evil\\x1b\""), "{text}");
    }

    #[test]
    fn unit_has_the_binary_restart_policy_and_environment() {
        let spec = ServiceSpec {
            egpud: "/home/ada/my bin/egpud".into(),
            args: vec!["--keep-alive".into(), "30m".into(), "100%".into()],
            path_env: "/usr/bin:/bin".into(),
            home: "/home/ada".into(),
            env: vec![("DEV".into(), "AMD".into()), ("EXTRA".into(), "a b".into())],
        };
        let text = unit(&spec);
        assert!(
            text.contains("\nExecStart=\"/home/ada/my bin/egpud\" --keep-alive 30m 100%%\n"),
            "{text}"
        );
        assert!(text.contains("\nRestart=on-failure\n"), "{text}");
        assert!(text.contains("\nEnvironment=DEV=AMD\n"), "{text}");
        assert!(!text.contains("PCI+AMD"), "{text}");
        assert!(
            text.contains("\nEnvironment=EGPU_LOG=info\nEnvironment=\"EXTRA=a b\"\n"),
            "{text}"
        );
        assert!(
            text.contains("\nEnvironment=PATH=/usr/bin:/bin\n"),
            "{text}"
        );
        assert!(text.contains("\nWantedBy=default.target\n"), "{text}");
        assert_eq!(
            unit_path(Path::new("/home/ada/.config")),
            Path::new("/home/ada/.config/systemd/user/egpud.service")
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("/usr/bin/egpud"), "/usr/bin/egpud");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(quote("$HOME"), "$$HOME");
        assert_eq!(quote(""), "\"\"");
    }
}
