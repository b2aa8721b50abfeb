//! The AWS command line's own files, for the settings the environment does not give:
//! `~/.aws/credentials` (`$AWS_SHARED_CREDENTIALS_FILE`) and `~/.aws/config`
//! (`$AWS_CONFIG_FILE`), profile `$AWS_PROFILE` (else `default`). `object_store` reads only the
//! environment; a cluster user who ran `aws configure` expects these to work as they do for
//! `aws s3 ls`. Read: `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`,
//! `region`, `endpoint_url`. Not read: `credential_process`, SSO and role profiles (use the
//! environment, or the instance's own credentials, which `object_store` finds).

use std::collections::HashMap;
use std::path::PathBuf;

/// The settings found, named as `object_store` names them (`aws_access_key_id`, ...), for
/// those the environment does not set.
pub fn settings() -> Vec<(&'static str, String)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let home = env("HOME").map(PathBuf::from);
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let credentials = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".aws/credentials")));
    let config = env("AWS_CONFIG_FILE").map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(".aws/config")));
    let read = |p: Option<PathBuf>| p.and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
    let creds = section(&read(credentials), &profile);
    // In the config file, profiles other than the default are `[profile NAME]`.
    let config_text = read(config);
    let mut conf = section(&config_text, &format!("profile {profile}"));
    if conf.is_empty() {
        conf = section(&config_text, &profile);
    }
    let mut out = Vec::new();
    let mut take = |env_names: &[&str], key: &'static str, value: Option<&String>| {
        if env_names.iter().all(|n| env(n).is_none()) {
            if let Some(v) = value {
                out.push((key, v.clone()));
            }
        }
    };
    // Credentials come as a set: from the files only when the environment has none.
    if env("AWS_ACCESS_KEY_ID").is_none() {
        take(&["AWS_ACCESS_KEY_ID"], "aws_access_key_id", creds.get("aws_access_key_id"));
        take(&["AWS_SECRET_ACCESS_KEY"], "aws_secret_access_key", creds.get("aws_secret_access_key"));
        take(&["AWS_SESSION_TOKEN"], "aws_session_token", creds.get("aws_session_token"));
    }
    take(&["AWS_REGION", "AWS_DEFAULT_REGION"], "aws_region", conf.get("region"));
    take(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"], "aws_endpoint", conf.get("endpoint_url"));
    out
}

/// The `key = value` lines of `[name]` in an INI file.
fn section(text: &str, name: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::section;

    #[test]
    fn sections_are_read_as_the_aws_cli_writes_them() {
        let text = "[default]\naws_access_key_id = AKIA1\naws_secret_access_key=s1\n\n# a comment\n\
                    [profile lofar]\nregion = eu-west-1\nendpoint_url = https://s3.example.org\n[other]\nregion=x\n";
        let d = section(text, "default");
        assert_eq!((d["aws_access_key_id"].as_str(), d["aws_secret_access_key"].as_str()), ("AKIA1", "s1"));
        let p = section(text, "profile lofar");
        assert_eq!(p["endpoint_url"], "https://s3.example.org");
        assert_eq!(p.len(), 2);
        assert!(section(text, "missing").is_empty());
    }
}
