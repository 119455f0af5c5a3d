//! The `rtsp:` section: the operator's live view, one RTSP mount per camera.

use crate::daemon::config::{Invalid, resolve, within};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// H.264 encoders the stream can use (GStreamer element names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum Encoder {
    /// Software, every machine (gstreamer1.0-plugins-ugly); tuned for zero latency.
    #[default]
    #[serde(rename = "x264enc")]
    X264,
    /// Software, Cisco's (gstreamer1.0-plugins-bad).
    #[serde(rename = "openh264enc")]
    OpenH264,
    /// Jetson's hardware encoder (JetPack's GStreamer plugins).
    #[serde(rename = "nvv4l2h264enc")]
    Nvv4l2,
}

impl Encoder {
    /// The GStreamer elements a stream with this encoder needs that are not installed,
    /// with the packages that have them; None when all are there. GStreamer must be
    /// initialised.
    pub fn missing_elements(self) -> Option<String> {
        let mut missing: Vec<&str> = ELEMENTS
            .iter()
            .copied()
            .chain([self.element()])
            .filter(|e| gstreamer::ElementFactory::find(e).is_none())
            .collect();
        if self == Encoder::Nvv4l2 && gstreamer::ElementFactory::find("nvvidconv").is_none() {
            missing.push("nvvidconv");
        }
        (!missing.is_empty()).then(|| {
            format!(
                "GStreamer element(s) not installed: {} (x264enc: gstreamer1.0-plugins-ugly; \
                 textoverlay: gstreamer1.0-x; rtph264pay: gstreamer1.0-plugins-good)",
                missing.join(", ")
            )
        })
    }

    pub fn element(self) -> &'static str {
        match self {
            Encoder::X264 => "x264enc",
            Encoder::OpenH264 => "openh264enc",
            Encoder::Nvv4l2 => "nvv4l2h264enc",
        }
    }

    /// The encoder's gst-launch text: `kbps` bitrate, a key frame every `gop` frames.
    pub fn launch(self, kbps: u32, gop: u32) -> String {
        match self {
            Encoder::X264 => format!(
                "x264enc tune=zerolatency speed-preset=ultrafast sliced-threads=false bitrate={kbps} key-int-max={gop} ! video/x-h264,profile=baseline"
            ),
            Encoder::OpenH264 => {
                format!("openh264enc bitrate={} gop-size={gop}", kbps * 1000)
            }
            Encoder::Nvv4l2 => format!(
                "nvvidconv ! video/x-raw(memory:NVMM),format=NV12 ! nvv4l2h264enc bitrate={} iframeinterval={gop} insert-sps-pps=true",
                kbps * 1000
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtspConfig {
    /// Serve the operator view (off unless set).
    #[serde(default)]
    pub enabled: bool,
    /// Address to listen on; loopback unless the view must be reachable from elsewhere.
    #[serde(default = "default_address")]
    pub address: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub encoder: Encoder,
    #[serde(default = "default_bitrate")]
    pub bitrate_kbps: u32,
    /// Output size; 0 keeps the camera's.
    #[serde(default)]
    pub width: u32,
    #[serde(default)]
    pub height: u32,
    /// At most this long between key frames: how long a new viewer waits for a picture.
    #[serde(default = "default_keyframe")]
    pub keyframe_interval_s: f64,
    /// `user:password` lines; viewers must log in (basic or digest).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Serve without credentials on a non-loopback address (refused unless set).
    #[serde(default)]
    pub allow_anonymous: bool,
}

fn default_address() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    8554
}
fn default_bitrate() -> u32 {
    2000
}
fn default_keyframe() -> f64 {
    1.0
}

impl Default for RtspConfig {
    fn default() -> Self {
        RtspConfig {
            enabled: false,
            address: default_address(),
            port: default_port(),
            encoder: Encoder::default(),
            bitrate_kbps: default_bitrate(),
            width: 0,
            height: 0,
            keyframe_interval_s: default_keyframe(),
            credentials_file: None,
            allow_anonymous: false,
        }
    }
}

/// The elements every stream needs besides the encoder.
const ELEMENTS: [&str; 6] = [
    "appsrc",
    "videoconvert",
    "videoscale",
    "textoverlay",
    "rtph264pay",
    "capsfilter",
];

impl RtspConfig {
    /// Checks the section and reads the credentials (user -> password). Needs GStreamer
    /// initialised to find the plugins.
    pub fn validate(&mut self, base: &Path) -> Result<BTreeMap<String, String>, Invalid> {
        if !self.enabled {
            return Ok(BTreeMap::new());
        }
        let ip: IpAddr = self
            .address
            .parse()
            .map_err(|_| Invalid::new("rtsp.address", "must be an IP address like 127.0.0.1"))?;
        if self.port == 0 {
            return Err(Invalid::new("rtsp.port", "must be 1 to 65535"));
        }
        within(
            "rtsp.bitrate_kbps",
            self.bitrate_kbps,
            64,
            100_000,
            " kbit/s",
        )?;
        for (key, v) in [("rtsp.width", self.width), ("rtsp.height", self.height)] {
            if v != 0 {
                within(key, v, 16, 7680, " pixels (0: the camera's)")?;
                if v % 2 != 0 {
                    return Err(Invalid::new(key, "must be even (H.264 4:2:0)"));
                }
            }
        }
        within(
            "rtsp.keyframe_interval_s",
            self.keyframe_interval_s,
            0.1,
            10.0,
            " seconds",
        )?;
        gstreamer::init().map_err(|e| {
            Invalid::new("rtsp.encoder", format!("cannot initialise GStreamer: {e}"))
        })?;
        if let Some(why) = self.encoder.missing_elements() {
            return Err(Invalid::new("rtsp.encoder", why));
        }
        let credentials = match &self.credentials_file {
            Some(f) => {
                let f = resolve(base, f);
                self.credentials_file = Some(f.clone());
                read_credentials(&f)?
            }
            None => BTreeMap::new(),
        };
        if credentials.is_empty() && !ip.is_loopback() && !self.allow_anonymous {
            return Err(Invalid::new(
                "rtsp.address",
                "a non-loopback address without credentials_file would show the line to anyone \
                 on the network; set credentials_file, or allow_anonymous: true",
            ));
        }
        Ok(credentials)
    }
}

/// `user:password` per line; `#` comments and blank lines are skipped. Errors name the
/// line, never its content (it holds a password).
fn read_credentials(path: &Path) -> Result<BTreeMap<String, String>, Invalid> {
    let text = crate::path_error::read_text_limited(path, 64 << 10).map_err(|e| {
        Invalid::new(
            "rtsp.credentials_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let mut users = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((user, pass))
                if !user.is_empty() && !pass.is_empty() && !user.contains(char::is_whitespace) =>
            {
                users.insert(user.to_string(), pass.to_string());
            }
            _ => {
                return Err(Invalid::new(
                    "rtsp.credentials_file",
                    format!(
                        "{} line {}: expected `user:password`",
                        path.display(),
                        i + 1
                    ),
                ));
            }
        }
    }
    if users.is_empty() {
        return Err(Invalid::new(
            "rtsp.credentials_file",
            format!("{}: no `user:password` line", path.display()),
        ));
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> RtspConfig {
        RtspConfig {
            enabled: true,
            ..Default::default()
        }
    }

    #[test]
    fn ranges_the_anonymous_rule_and_credentials() {
        gstreamer::init().unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert!(enabled().validate(dir.path()).unwrap().is_empty());
        let e = RtspConfig {
            address: "0.0.0.0".into(),
            ..enabled()
        }
        .validate(dir.path())
        .unwrap_err();
        assert_eq!(e.key, "rtsp.address");
        assert!(
            RtspConfig {
                address: "0.0.0.0".into(),
                allow_anonymous: true,
                ..enabled()
            }
            .validate(dir.path())
            .is_ok()
        );
        let creds = dir.path().join("users");
        std::fs::write(&creds, "# viewers\noperator:s3cret\n").unwrap();
        let users = RtspConfig {
            address: "0.0.0.0".into(),
            credentials_file: Some("users".into()),
            ..enabled()
        }
        .validate(dir.path())
        .unwrap();
        assert_eq!(users.get("operator").map(String::as_str), Some("s3cret"));
        std::fs::write(&creds, "operator s3cret\n").unwrap();
        let e = RtspConfig {
            credentials_file: Some(creds.clone()),
            ..enabled()
        }
        .validate(dir.path())
        .unwrap_err();
        assert!(
            e.reason.contains("line 1") && !e.reason.contains("s3cret"),
            "{}",
            e.reason
        );
        for bad in [
            RtspConfig {
                width: 641,
                ..enabled()
            },
            RtspConfig {
                bitrate_kbps: 1,
                ..enabled()
            },
            RtspConfig {
                keyframe_interval_s: 0.0,
                ..enabled()
            },
            RtspConfig {
                port: 0,
                ..enabled()
            },
        ] {
            assert!(bad.clone().validate(dir.path()).is_err(), "{bad:?}");
        }
        // A disabled section is not checked at all.
        assert!(
            RtspConfig {
                port: 0,
                ..Default::default()
            }
            .validate(dir.path())
            .is_ok()
        );
    }
}
