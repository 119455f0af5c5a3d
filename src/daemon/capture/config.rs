//! The `cameras:` section: one entry per camera, validated here (by `check-config` and
//! `cras run` alike) and rendered into the capture pipeline the camera runs.

use super::template::{Memory, PipelineTemplate};
use crate::daemon::config::{Invalid, topic_safe, within};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    /// Camera id: letters, digits, `-` and `_` (it becomes an MQTT topic level).
    pub id: String,
    /// Template name in the pipelines folder.
    pub pipeline: String,
    /// Template parameters.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Product class: `auto` (the model chooses per frame) or one of the model's classes.
    #[serde(default = "default_class")]
    pub class: String,
    /// Frames per second taken from this camera at most.
    #[serde(default = "default_max_fps")]
    pub max_fps: f64,
    /// Seconds without a frame after which the camera counts as lost and its pipeline is
    /// rebuilt; 0 turns the check off (hardware-triggered cameras with long pauses).
    #[serde(default = "default_stall")]
    pub stall_timeout_s: f64,
    /// Streamed in the operator view when `rtsp.enabled` (default true).
    #[serde(default = "default_rtsp")]
    pub rtsp: bool,
}

fn default_rtsp() -> bool {
    true
}

fn default_stall() -> f64 {
    10.0
}
fn default_class() -> String {
    "auto".into()
}
fn default_max_fps() -> f64 {
    5.0
}

/// A camera's capture pipeline, rendered from its template.
#[derive(Debug, Clone)]
pub struct CameraPipeline {
    /// gst-launch text.
    pub text: String,
    /// A finite source (the template says `# finite`): end of stream ends the camera.
    pub finite: bool,
    /// Where the template delivers frames.
    pub memory: Memory,
    /// For a device-memory template: its host-memory fallback, rendered with the same
    /// parameters (template name, gst-launch text).
    pub host: Option<(String, String)>,
}

impl CameraConfig {
    /// The camera's own checks; `i` is its place in the list (for the key).
    fn validate(
        &self,
        i: usize,
        classes: &[String],
        templates: &Path,
    ) -> Result<CameraPipeline, Invalid> {
        let key = |k: &str| format!("cameras[{i}].{k}");
        if !topic_safe(&self.id) {
            return Err(Invalid::new(
                key("id"),
                "use 1 to 64 letters, digits, `-` and `_` (it is an MQTT topic level)",
            ));
        }
        if self.class != "auto" && !classes.contains(&self.class) {
            return Err(Invalid::new(
                key("class"),
                format!(
                    "`{}` is neither `auto` nor a class of the model ({})",
                    self.class,
                    classes.join(", ")
                ),
            ));
        }
        within(
            &key("max_fps"),
            self.max_fps,
            0.001,
            1000.0,
            " frames per second",
        )?;
        if self.stall_timeout_s != 0.0 {
            within(
                &key("stall_timeout_s"),
                self.stall_timeout_s,
                0.1,
                86_400.0,
                " seconds, or 0 (off)",
            )?;
        }
        let template = PipelineTemplate::load(templates, &self.pipeline)
            .map_err(|e| Invalid::new(key("pipeline"), e.to_string()))?;
        let text = template
            .render(&self.params)
            .map_err(|e| Invalid::new(key("params"), e.to_string()))?;
        let host = match &template.fallback {
            Some(name) => {
                let fallback = PipelineTemplate::load(templates, name)
                    .map_err(|e| Invalid::new(key("pipeline"), format!("its fallback: {e}")))?;
                if fallback.memory != Memory::Host {
                    return Err(Invalid::new(
                        key("pipeline"),
                        format!("its fallback `{name}` is not a host-memory template"),
                    ));
                }
                let text = fallback
                    .render(&self.params)
                    .map_err(|e| Invalid::new(key("params"), format!("its fallback: {e}")))?;
                Some((name.clone(), text))
            }
            None => None,
        };
        Ok(CameraPipeline {
            text,
            finite: template.finite,
            memory: template.memory,
            host,
        })
    }
}

/// Checks every camera (ids unique, classes of the model, templates and parameters) and
/// renders their pipelines, by camera id.
pub fn validate(
    cameras: &[CameraConfig],
    classes: &[String],
    templates: &Path,
) -> Result<BTreeMap<String, CameraPipeline>, Invalid> {
    if cameras.is_empty() {
        return Err(Invalid::new("cameras", "at least one camera is needed"));
    }
    let mut ids = BTreeSet::new();
    let mut pipelines = BTreeMap::new();
    for (i, cam) in cameras.iter().enumerate() {
        let pipeline = cam.validate(i, classes, templates)?;
        if !ids.insert(cam.id.clone()) {
            return Err(Invalid::new(
                format!("cameras[{i}].id"),
                format!("`{}` is used by another camera", cam.id),
            ));
        }
        pipelines.insert(cam.id.clone(), pipeline);
    }
    Ok(pipelines)
}
