//! The run's report: a summary table on stdout and the same as JSON.

use serde_json::Value;

use crate::scenario::{Outcome, Settings};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub settings: Settings,
    pub outcomes: Vec<Outcome>,
    /// Every scenario ran and converged.
    pub passed: bool,
    /// Why the run stopped early, if it did.
    pub error: Option<String>,
}

fn flat(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flat(&key, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

impl Report {
    pub fn table(&self) -> String {
        let mut text = format!(
            "\nloadtest: {} nodes × {} pods, churn {}/s for {} s, seed {}\n",
            self.settings.nodes,
            self.settings.pods_per_node,
            self.settings.churn_rate,
            self.settings.duration_s,
            self.settings.seed
        );
        text.push_str(&format!(
            "{:<14} {:>8} {:>10}  {}\n",
            "scenario", "seconds", "converged", "measures"
        ));
        for outcome in &self.outcomes {
            let mut fields = Vec::new();
            for (k, v) in &outcome.metrics {
                flat(k, v, &mut fields);
            }
            let converged = if outcome.convergence.converged {
                format!("{:.1}s", outcome.convergence.seconds)
            } else {
                "NO".into()
            };
            let mut first = true;
            for (k, v) in fields {
                let (name, secs, conv) = if first {
                    (
                        outcome.scenario.as_str(),
                        format!("{:.1}", outcome.seconds),
                        converged.as_str(),
                    )
                } else {
                    ("", String::new(), "")
                };
                first = false;
                text.push_str(&format!("{name:<14} {secs:>8} {conv:>10}  {k} = {v}\n"));
            }
            for difference in &outcome.convergence.differences {
                text.push_str(&format!("{:<36}DIFF {difference}\n", ""));
            }
        }
        if let Some(error) = &self.error {
            text.push_str(&format!("stopped: {error}\n"));
        }
        text.push_str(if self.passed {
            "result: PASS (every scenario converged)\n"
        } else {
            "result: FAIL\n"
        });
        text
    }
}
