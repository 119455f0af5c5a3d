//! Capture pipeline templates (`pipelines/<name>.pipeline`): gst-launch text with
//! `{param}` placeholders, ending in `appsink name=sink`. Header comments declare the
//! parameters: `# param NAME` (required) or `# param NAME=DEFAULT`. A finite source (a
//! file, a folder) says `# finite`: its end of stream means the camera is done; for any
//! other source, end of stream means the camera was lost (rtspsrc, for one, ends its
//! stream when the server goes away) and the pipeline is rebuilt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the capture templates are: `explicit` if given, else `pipelines/` beside the
/// config file, else the system location `/usr/share/cras/pipelines`.
pub fn templates_dir(explicit: Option<PathBuf>, config: &Path) -> PathBuf {
    explicit.unwrap_or_else(|| {
        let beside = config.parent().unwrap_or(Path::new(".")).join("pipelines");
        if beside.is_dir() {
            beside
        } else {
            PathBuf::from("/usr/share/cras/pipelines")
        }
    })
}

#[derive(Debug, Clone)]
pub struct PipelineTemplate {
    pub name: String,
    pub path: PathBuf,
    /// Parameter name -> default (None = required).
    pub params: BTreeMap<String, Option<String>>,
    pub body: String,
    /// Declared `# finite`: end of stream ends the camera instead of reconnecting.
    pub finite: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("pipeline template `{name}` not found at {path}")]
    NotFound { name: String, path: PathBuf },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("pipeline `{name}` needs parameter `{param}`")]
    MissingParam { name: String, param: String },
    #[error("pipeline `{name}` has no parameter `{param}` (it takes: {known})")]
    UnknownParam {
        name: String,
        param: String,
        known: String,
    },
    #[error(
        "pipeline `{name}` parameter `{param}`: value {value:?} may not contain `!`, quotes or newlines"
    )]
    UnsafeValue {
        name: String,
        param: String,
        value: String,
    },
}

impl PipelineTemplate {
    pub fn load(dir: &Path, name: &str) -> Result<PipelineTemplate, TemplateError> {
        let path = dir.join(format!("{name}.pipeline"));
        let text = std::fs::read_to_string(&path).map_err(|_| TemplateError::NotFound {
            name: name.to_string(),
            path: path.clone(),
        })?;
        Self::parse(name, &path, &text)
    }

    pub fn parse(name: &str, path: &Path, text: &str) -> Result<PipelineTemplate, TemplateError> {
        let mut params = BTreeMap::new();
        let mut body = Vec::new();
        let mut finite = false;
        for line in text.lines() {
            let t = line.trim();
            if t == "# finite" {
                finite = true;
            } else if let Some(decl) = t.strip_prefix("# param ") {
                let (k, v) = match decl.split_once('=') {
                    Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
                    None => (decl.trim().to_string(), None),
                };
                params.insert(k, v);
            } else if !t.starts_with('#') && !t.is_empty() {
                body.push(t);
            }
        }
        let body = body.join(" ");
        let invalid = |reason: String| TemplateError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        if !body.contains("appsink name=sink") {
            return Err(invalid(
                "the pipeline must end in `appsink name=sink`".into(),
            ));
        }
        // Every placeholder must be declared, and every declared parameter used.
        let mut used = Vec::new();
        let mut rest = body.as_str();
        while let Some(start) = rest.find('{') {
            let end = rest[start..]
                .find('}')
                .ok_or_else(|| invalid("unclosed `{`".into()))?;
            used.push(rest[start + 1..start + end].to_string());
            rest = &rest[start + end + 1..];
        }
        for u in &used {
            if !params.contains_key(u) {
                return Err(invalid(format!(
                    "placeholder {{{u}}} is not declared with `# param {u}`"
                )));
            }
        }
        Ok(PipelineTemplate {
            name: name.to_string(),
            path: path.to_path_buf(),
            params,
            body,
            finite,
        })
    }

    /// The gst-launch description with `values` filled in (defaults for the rest).
    pub fn render(&self, values: &BTreeMap<String, String>) -> Result<String, TemplateError> {
        for k in values.keys() {
            if !self.params.contains_key(k) {
                return Err(TemplateError::UnknownParam {
                    name: self.name.clone(),
                    param: k.clone(),
                    known: self.params.keys().cloned().collect::<Vec<_>>().join(", "),
                });
            }
        }
        let mut out = self.body.clone();
        for (k, default) in &self.params {
            let v = match (values.get(k), default) {
                (Some(v), _) => v.clone(),
                (None, Some(d)) => d.clone(),
                (None, None) => {
                    return Err(TemplateError::MissingParam {
                        name: self.name.clone(),
                        param: k.clone(),
                    });
                }
            };
            // Values are spliced into gst-launch syntax: refuse what could add elements.
            if v.contains(['!', '"', '\'', '\n']) {
                return Err(TemplateError::UnsafeValue {
                    name: self.name.clone(),
                    param: k.clone(),
                    value: v,
                });
            }
            out = out.replace(&format!("{{{k}}}"), &v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> PipelineTemplate {
        PipelineTemplate::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines"),
            name,
        )
        .unwrap()
    }

    #[test]
    fn every_shipped_template_parses_and_renders_with_its_defaults_or_required_params() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let t = shipped(&name);
            let required: BTreeMap<String, String> = t
                .params
                .iter()
                .filter(|(_, d)| d.is_none())
                .map(|(k, _)| (k.clone(), "x".to_string()))
                .collect();
            let text = t.render(&required).unwrap();
            assert!(
                !text.contains('{') && text.contains("appsink name=sink"),
                "{name}: {text}"
            );
            n += 1;
        }
        assert!(n >= 7);
    }

    #[test]
    fn render_rejects_missing_unknown_and_unsafe_values() {
        let t = shipped("rtsp");
        assert!(matches!(
            t.render(&BTreeMap::new()),
            Err(TemplateError::MissingParam { .. })
        ));
        let mut v = BTreeMap::from([("url".to_string(), "rtsp://cam/1".to_string())]);
        assert!(
            t.render(&v)
                .unwrap()
                .contains("location=rtsp://cam/1 latency=200")
        );
        v.insert("colour".into(), "red".into());
        assert!(matches!(
            t.render(&v),
            Err(TemplateError::UnknownParam { .. })
        ));
        let v = BTreeMap::from([(
            "url".to_string(),
            "x ! filesink location=/etc/passwd".to_string(),
        )]);
        assert!(matches!(
            t.render(&v),
            Err(TemplateError::UnsafeValue { .. })
        ));
    }
}
