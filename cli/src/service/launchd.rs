//! macOS: a launchd LaunchAgent in `~/Library/LaunchAgents`, logging to `~/Library/Logs/egpu`.

use std::path::{Path, PathBuf};

use plist::{Dictionary, Value};

use super::ServiceSpec;

/// The LaunchAgent's label (and the plist's file name without `.plist`).
pub const LABEL: &str = "dev.egpu.egpud";
/// Seconds launchd waits before starting egpud again after it died.
pub const THROTTLE_SECONDS: u64 = 10;
/// The tinygrad device that reaches the eGPU (the Radeon over Thunderbolt, without a driver).
pub const TINYGRAD_DEV: &str = "PCI+AMD";

pub fn plist_path(home: &Path) -> PathBuf {
    home.join("Library/LaunchAgents")
        .join(format!("{LABEL}.plist"))
}

pub fn log_dir(home: &Path) -> PathBuf {
    home.join("Library/Logs/egpu")
}

pub fn log_file(home: &Path) -> PathBuf {
    log_dir(home).join("egpud.log")
}

/// `gui/<uid>`: the login session's launchd domain.
pub fn domain(uid: u32) -> String {
    format!("gui/{uid}")
}

/// `gui/<uid>/<label>`: the service in that domain.
pub fn service_target(uid: u32) -> String {
    format!("gui/{uid}/{LABEL}")
}

/// The LaunchAgent as a plist dictionary.
pub fn plist_value(spec: &ServiceSpec) -> Value {
    let mut program = vec![Value::String(spec.egpud.display().to_string())];
    program.extend(spec.args.iter().cloned().map(Value::String));
    // Started again when it dies (crash, kill -9), not after a clean exit (SIGTERM, or a
    // refusal to start such as a live egpud on the socket).
    let mut keep_alive = Dictionary::new();
    keep_alive.insert("SuccessfulExit".into(), Value::Boolean(false));
    let mut env = Dictionary::new();
    for (key, value) in spec.environment() {
        env.insert(key, Value::String(value));
    }
    let log = log_file(&spec.home).display().to_string();

    let mut dict = Dictionary::new();
    dict.insert("Label".into(), Value::String(LABEL.into()));
    dict.insert("ProgramArguments".into(), Value::Array(program));
    dict.insert("RunAtLoad".into(), Value::Boolean(true));
    dict.insert("KeepAlive".into(), Value::Dictionary(keep_alive));
    dict.insert(
        "ThrottleInterval".into(),
        Value::Integer(THROTTLE_SECONDS.into()),
    );
    dict.insert("EnvironmentVariables".into(), Value::Dictionary(env));
    dict.insert("StandardOutPath".into(), Value::String(log.clone()));
    dict.insert("StandardErrorPath".into(), Value::String(log));
    dict.insert("ProcessType".into(), Value::String("Interactive".into()));
    Value::Dictionary(dict)
}

/// The plist file's bytes (XML).
pub fn plist(spec: &ServiceSpec) -> Vec<u8> {
    let mut out = Vec::new();
    plist_value(spec)
        .to_writer_xml(&mut out)
        .expect("writing a plist to memory");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec {
            egpud: "/opt/egpu/bin/egpud".into(),
            args: vec!["--memory-budget".into(), "8GiB".into()],
            path_env: "/opt/py/bin:/usr/bin:/bin".into(),
            home: "/Users/ada".into(),
            env: Vec::new(),
        }
    }

    #[test]
    fn plist_parses_with_the_required_keys() {
        let bytes = plist(&spec());
        let value = Value::from_reader_xml(&bytes[..]).expect("the plist parses");
        let dict = value.as_dictionary().expect("a dictionary");
        assert_eq!(dict["Label"].as_string(), Some(LABEL));
        let program: Vec<&str> = dict["ProgramArguments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_string().unwrap())
            .collect();
        assert_eq!(program, ["/opt/egpu/bin/egpud", "--memory-budget", "8GiB"]);
        assert_eq!(dict["RunAtLoad"].as_boolean(), Some(true));
        let keep_alive = dict["KeepAlive"].as_dictionary().unwrap();
        assert_eq!(keep_alive["SuccessfulExit"].as_boolean(), Some(false));
        assert_eq!(
            dict["ThrottleInterval"].as_unsigned_integer(),
            Some(THROTTLE_SECONDS)
        );
        for key in ["StandardOutPath", "StandardErrorPath"] {
            assert_eq!(
                dict[key].as_string(),
                Some("/Users/ada/Library/Logs/egpu/egpud.log")
            );
        }
        let env = dict["EnvironmentVariables"].as_dictionary().unwrap();
        assert_eq!(env["DEV"].as_string(), Some("PCI+AMD"));
        assert_eq!(env["PATH"].as_string(), Some("/opt/py/bin:/usr/bin:/bin"));

        let mut custom = spec();
        custom.env = vec![
            ("DEV".into(), "PCI+AMD:LLVM".into()),
            (
                "EGPU_WORKER_PYTHON".into(),
                "/Users/ada/egpu/worker/.venv/bin/python".into(),
            ),
        ];
        let value = Value::from_reader_xml(&plist(&custom)[..]).unwrap();
        let env = value.as_dictionary().unwrap()["EnvironmentVariables"]
            .as_dictionary()
            .unwrap()
            .clone();
        let keys: Vec<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(keys, ["DEV", "PATH", "EGPU_LOG", "EGPU_WORKER_PYTHON"]);
        assert_eq!(env["DEV"].as_string(), Some("PCI+AMD:LLVM"));
        assert_eq!(
            env["EGPU_WORKER_PYTHON"].as_string(),
            Some("/Users/ada/egpu/worker/.venv/bin/python")
        );
    }

    #[test]
    fn paths_and_targets() {
        let home = Path::new("/Users/ada");
        assert_eq!(
            plist_path(home),
            Path::new("/Users/ada/Library/LaunchAgents/dev.egpu.egpud.plist")
        );
        assert_eq!(domain(501), "gui/501");
        assert_eq!(service_target(501), "gui/501/dev.egpu.egpud");
    }
}
