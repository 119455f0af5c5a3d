//! Capture pipeline templates (`pipelines/<name>.pipeline`): gst-launch text with
//! `{param}` placeholders, ending in `appsink name=sink`. Header comments declare the
//! parameters: `# param NAME` (required) or `# param NAME=DEFAULT`. A finite source (a
//! file, a folder) says `# finite`: its end of stream means the camera is done; for any
//! other source, end of stream means the camera was lost (rtspsrc, for one, ends its
//! stream when the server goes away) and the pipeline is rebuilt.
//!
//! A template whose frames stay in GPU memory says so with `# memory cuda` (GStreamer's
//! `memory:CUDAMemory`) or `# memory nvmm` (Jetson's `memory:NVMM`), and names the
//! host-memory template to use where device frames cannot be taken with
//! `# fallback NAME` (required for them; it must take the same parameters).

pub use crate::engine::Memory;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the capture templates are: `explicit` if given, else `pipelines/` beside the
/// config file, else the package's `share/cras/pipelines` (`/usr/share/cras/pipelines`).
pub fn templates_dir(explicit: Option<PathBuf>, config: &Path) -> PathBuf {
    explicit.unwrap_or_else(|| {
        let beside = config.parent().unwrap_or(Path::new(".")).join("pipelines");
        if beside.is_dir() {
            beside
        } else {
            crate::install::packaged("share/cras/pipelines")
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
    /// Declared `# memory ...` (host when absent).
    pub memory: Memory,
    /// Declared `# fallback NAME`: the host-memory template for a device one.
    pub fallback: Option<String>,
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
    /// The value is not echoed: it may hold a password (an RTSP URL's).
    #[error(
        "pipeline `{name}` parameter `{param}`: the value may not contain `!`, quotes, \
         backslashes or control characters"
    )]
    UnsafeValue { name: String, param: String },
}

impl PipelineTemplate {
    pub fn load(dir: &Path, name: &str) -> Result<PipelineTemplate, TemplateError> {
        let path = dir.join(format!("{name}.pipeline"));
        let text = crate::path_error::read_text_limited(&path, crate::path_error::limits::TEXT)
            .map_err(|_| TemplateError::NotFound {
                name: name.to_string(),
                path: path.clone(),
            })?;
        Self::parse(name, &path, &text)
    }

    pub fn parse(name: &str, path: &Path, text: &str) -> Result<PipelineTemplate, TemplateError> {
        let mut params = BTreeMap::new();
        let mut body = Vec::new();
        let mut finite = false;
        let mut memory = Memory::Host;
        let mut fallback = None;
        let invalid = |reason: String| TemplateError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        for line in text.lines() {
            let t = line.trim();
            if t == "# finite" {
                finite = true;
            } else if let Some(m) = t.strip_prefix("# memory ") {
                memory = match m.trim() {
                    "host" => Memory::Host,
                    "cuda" => Memory::Cuda,
                    "nvmm" => Memory::Nvmm,
                    other => {
                        return Err(invalid(format!(
                            "`# memory {other}`: use host, cuda or nvmm"
                        )));
                    }
                };
            } else if let Some(f) = t.strip_prefix("# fallback ") {
                fallback = Some(f.trim().to_string());
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
        if memory != Memory::Host && fallback.is_none() {
            return Err(invalid(format!(
                "a `# memory {}` template needs `# fallback NAME`, the host-memory template \
                 to use where device frames cannot be taken",
                memory.name()
            )));
        }
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
            memory,
            fallback,
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
            out = out.replace(
                &format!("{{{k}}}"),
                &gst_value(&v).ok_or_else(|| TemplateError::UnsafeValue {
                    name: self.name.clone(),
                    param: k.clone(),
                })?,
            );
        }
        Ok(out)
    }
}

/// A parameter value as one gst-launch token: as it is when it is a plain token, else in
/// double quotes (a path with spaces, a URL with a query), so it can never end the
/// property and add elements or properties. None for what quoting cannot hold safely.
fn gst_value(v: &str) -> Option<String> {
    if v.chars()
        .any(|c| c.is_control() || matches!(c, '!' | '"' | '\'' | '\\'))
    {
        return None;
    }
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:/%@+~".contains(c));
    Some(if plain {
        v.to_string()
    } else {
        format!("\"{v}\"")
    })
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
            // A device-memory template falls back to a host one with its parameters,
            // and its caps say the memory it declares.
            if let Some(f) = &t.fallback {
                let host = shipped(f);
                assert_eq!(host.memory, Memory::Host, "{name} -> {f}");
                assert_eq!(host.params, t.params, "{name} -> {f}");
                let caps = match t.memory {
                    Memory::Cuda => "video/x-raw(memory:CUDAMemory),format=RGBA ! appsink",
                    _ => "video/x-raw(memory:NVMM),format=RGBA ! appsink",
                };
                assert!(text.contains(caps), "{name}: {text}");
            }
            n += 1;
        }
        assert!(n >= 7);
    }

    #[test]
    fn a_device_memory_template_names_its_fallback() {
        let p = Path::new("x.pipeline");
        let body = "videotestsrc ! appsink name=sink";
        let t = PipelineTemplate::parse("x", p, &format!("# memory nvmm\n# fallback y\n{body}"));
        let t = t.unwrap();
        assert_eq!((t.memory, t.fallback.as_deref()), (Memory::Nvmm, Some("y")));
        let no_fallback = PipelineTemplate::parse("x", p, &format!("# memory cuda\n{body}"));
        assert!(
            matches!(&no_fallback, Err(TemplateError::Invalid { reason, .. }) if reason.contains("# fallback")),
            "{no_fallback:?}"
        );
        let odd = PipelineTemplate::parse("x", p, &format!("# memory vram\n{body}"));
        assert!(matches!(odd, Err(TemplateError::Invalid { .. })));
        assert_eq!(shipped("rtsp").memory, Memory::Host);
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

    #[test]
    fn values_with_spaces_are_one_quoted_token() {
        let t = shipped("image-sequence");
        let v = BTreeMap::from([("location".to_string(), "/data/line 2/%05d.png".to_string())]);
        let text = t.render(&v).unwrap();
        assert!(
            text.contains(r#"location="/data/line 2/%05d.png" index=0"#),
            "{text}"
        );
        // What used to add an element is now part of one quoted value.
        let v = BTreeMap::from([("location".to_string(), "x fakesink".to_string())]);
        assert!(t.render(&v).unwrap().contains(r#"location="x fakesink" "#));
        let secret = BTreeMap::from([(
            "location".to_string(),
            "rtsp://u:s3cret@cam/\"x".to_string(),
        )]);
        let err = t.render(&secret).unwrap_err().to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn quoted_values_parse_as_one_property_in_gstreamer() {
        gstreamer::init().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("with space");
        let t = shipped("image-sequence");
        let v = BTreeMap::from([(
            "location".to_string(),
            format!("{}/%05d.png", folder.display()),
        )]);
        let text = t.render(&v).unwrap();
        let pipeline = gstreamer::parse::launch(&text).unwrap();
        let bin = pipeline.downcast::<gstreamer::Bin>().unwrap();
        use gstreamer::prelude::*;
        let src = bin
            .iterate_elements()
            .into_iter()
            .flatten()
            .find(|e| e.factory().is_some_and(|f| f.name() == "multifilesrc"))
            .unwrap();
        assert_eq!(
            src.property::<Option<String>>("location").unwrap(),
            format!("{}/%05d.png", folder.display())
        );
    }
}
