//! The RTSP server: one mount per camera (`/<camera id>`), shared media (one encoder per
//! camera however many viewers), fed through appsrc. A mount's appsrc exists only while
//! its media is prepared, that is while someone watches; without a viewer nothing is
//! drawn or encoded.

use super::OperatorError;
use super::config::RtspConfig;
use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer_app::AppSrc;
use gstreamer_rtsp_server::prelude::*;
use gstreamer_rtsp_server::{RTSPAuth, RTSPMediaFactory, RTSPServer, RTSPToken};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Banner text by buffer time: the text of a frame is set on `textoverlay` as that very
/// frame reaches it (a pad probe), not when the next frame is pushed.
type Texts = Arc<Mutex<std::collections::BTreeMap<gst::ClockTime, String>>>;

/// The elements of a watched camera's media.
struct Live {
    src: AppSrc,
    banner: gst::Element,
    texts: Texts,
    /// The caps last set on `src`: (width, height).
    size: Option<(u32, u32)>,
}

/// One camera's mount.
pub struct Mount {
    pub id: String,
    live: Mutex<Option<Live>>,
    /// The stream's size (`rtsp.width`, `rtsp.height`; 0: the camera's), for the
    /// banner's font.
    out_size: (u32, u32),
    /// The frame rate the stream declares: the camera's `max_fps`, which judged frames
    /// never exceed. The encoder's latency is counted in frames of this rate, and the
    /// stream's sink holds each frame for that latency; a rate below the real one
    /// (the smoothed rate starts at 0) made a 2 s latency that two queued frames could
    /// not cover, and the first viewer saw bursts of 3 frames every 2 s.
    fps: f64,
}

impl Mount {
    /// Someone watches this camera.
    pub fn watched(&self) -> bool {
        self.live.lock().map(|l| l.is_some()).unwrap_or(false)
    }

    /// Hands an RGBx frame (`width` x `height`) and its banner text to the stream; false
    /// when nobody watches (nothing is done).
    pub fn push(&self, rgbx: Vec<u8>, width: u32, height: u32, text: &str) -> bool {
        let Ok(mut live) = self.live.lock() else {
            return false;
        };
        let Some(live) = live.as_mut() else {
            return false;
        };
        if live.size != Some((width, height)) {
            let rate = gst::Fraction::approximate_f64(self.fps.clamp(1.0, 120.0))
                .unwrap_or(gst::Fraction::new(30, 1));
            let caps = gst::Caps::builder("video/x-raw")
                .field("format", "RGBx")
                .field("width", width as i32)
                .field("height", height as i32)
                .field("framerate", rate)
                .build();
            live.src.set_caps(Some(&caps));
            // The band is drawn at the camera's size; the text goes on after scaling.
            let band = super::draw::banner_height(height);
            let (band, text_width) = match self.out_size {
                (w, h) if w > 0 && h > 0 => ((band * h / height.max(1)).max(1), w),
                _ => (band, width),
            };
            super::still::style_banner(&live.banner, band, text_width);
            live.size = Some((width, height));
        }
        // The frame's time, set here so that its text can be found by it downstream.
        let Some(pts) = live.src.current_running_time() else {
            return false;
        };
        if let Ok(mut texts) = live.texts.lock() {
            texts.insert(pts, text.to_string());
            while texts.len() > 8 {
                texts.pop_first();
            }
        }
        let mut buffer = gst::Buffer::from_mut_slice(rgbx);
        if let Some(b) = buffer.get_mut() {
            b.set_pts(pts);
        }
        live.src.push_buffer(buffer).is_ok()
    }
}

/// The RTSP server and its main loop thread.
pub struct Server {
    pub mounts: Arc<Vec<Arc<Mount>>>,
    main_loop: glib::MainLoop,
    thread: Option<JoinHandle<()>>,
}

/// The gst-launch text of one camera's media. `gop`: frames between key frames.
pub fn launch(cfg: &RtspConfig, gop: u32) -> String {
    let size = if cfg.width > 0 && cfg.height > 0 {
        format!(
            " ! videoscale ! video/x-raw,width={},height={}",
            cfg.width, cfg.height
        )
    } else {
        String::new()
    };
    format!(
        "( appsrc name=src is-live=true format=time block=false max-buffers=2 leaky-type=downstream \
         ! videoconvert{size} ! textoverlay name=banner valignment=top halignment=left \
         shaded-background=false ! videoconvert ! {} \
         ! rtph264pay name=pay0 pt=96 config-interval=-1 )",
        cfg.encoder.launch(cfg.bitrate_kbps, gop)
    )
}

const ROLE: &str = "operator";

/// A viewer whose connection takes no data for this long is cut off (TCP_USER_TIMEOUT).
/// gst-rtsp-server sends a shared stream to its TCP viewers from one thread and stops
/// pulling while none can take more, so a viewer that stops reading (a frozen HMI)
/// would freeze the picture of every viewer of that camera until its connection dies.
pub const STALLED_VIEWER: std::time::Duration = std::time::Duration::from_secs(5);

/// Sets TCP_USER_TIMEOUT on a new viewer's socket: unacknowledged data, or a receive
/// window that stays closed (Linux 5.11 and later), for [`STALLED_VIEWER`] ends the
/// connection, and with it the viewer's transport.
fn cut_off_when_stalled(client: &gstreamer_rtsp_server::RTSPClient) {
    use glib::translate::ToGlibPtr;
    // SAFETY: the client is alive for the duration of the signal; its connection and
    // socket are owned by it (transfer none) and only read here; the fd is not kept.
    let fd = unsafe {
        let conn =
            gstreamer_rtsp_server::ffi::gst_rtsp_client_get_connection(client.to_glib_none().0);
        if conn.is_null() {
            return;
        }
        let socket =
            gstreamer_rtsp_server::gst_rtsp::ffi::gst_rtsp_connection_get_read_socket(conn);
        if socket.is_null() {
            return;
        }
        gstreamer_rtsp_server::gio::ffi::g_socket_get_fd(socket)
    };
    let ms = STALLED_VIEWER.as_millis() as libc::c_uint;
    // SAFETY: a valid fd of a TCP socket, and a c_uint option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(
            "operator view: cannot set TCP_USER_TIMEOUT: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Server {
    /// Listens on the configured address and mounts `/<id>` for each camera shown.
    pub fn start(
        cfg: &RtspConfig,
        credentials: &BTreeMap<String, String>,
        cameras: &[super::ViewedCamera],
    ) -> Result<Server, OperatorError> {
        let context = glib::MainContext::new();
        let server = RTSPServer::new();
        server.set_address(&cfg.address);
        server.set_service(&cfg.port.to_string());
        if !credentials.is_empty() {
            let auth = RTSPAuth::new();
            let token = RTSPToken::builder()
                .field(gstreamer_rtsp_server::RTSP_TOKEN_MEDIA_FACTORY_ROLE, ROLE)
                .build();
            // Digest only: the password never crosses the network in clear (basic
            // would send it base64-encoded on every request).
            for (user, pass) in credentials {
                auth.add_digest(user, pass, &token);
            }
            auth.set_supported_methods(gstreamer_rtsp_server::gst_rtsp::RTSPAuthMethod::Digest);
            server.set_auth(Some(&auth));
        }
        server.connect_client_connected(|_, client| cut_off_when_stalled(client));
        let points = server
            .mount_points()
            .ok_or_else(|| OperatorError::Rtsp("the server has no mount points".into()))?;
        let mut mounts = Vec::new();
        for camera in cameras {
            let mount = Arc::new(Mount {
                id: camera.id.clone(),
                live: Mutex::new(None),
                out_size: (cfg.width, cfg.height),
                fps: camera.fps,
            });
            if camera.shown {
                let gop = (cfg.keyframe_interval_s * camera.fps).ceil().max(1.0) as u32;
                let factory = media_factory(&launch(cfg, gop), !credentials.is_empty());
                serve_into(&factory, mount.clone());
                points.add_factory(&format!("/{}", camera.id), factory);
            }
            mounts.push(mount);
        }
        let source = context
            .with_thread_default(|| server.attach(Some(&context)))
            .map_err(|e| OperatorError::Rtsp(e.to_string()))?
            .map_err(|_| OperatorError::Listen {
                address: cfg.address.clone(),
                port: cfg.port,
            })?;
        let main_loop = glib::MainLoop::new(Some(&context), false);
        let l = main_loop.clone();
        let thread = std::thread::Builder::new()
            .name("rtsp".into())
            .spawn(move || {
                let _ = context.with_thread_default(|| l.run());
                // The listening source is in this context, not the default one, which
                // is where `SourceId::remove` looks (and panics when it is not there).
                if let Some(s) = context.find_source_by_id(&source) {
                    s.destroy();
                }
                drop(server);
            })
            .map_err(OperatorError::Thread)?;
        Ok(Server {
            mounts: Arc::new(mounts),
            main_loop,
            thread: Some(thread),
        })
    }
}

/// A shared media factory for `launch`, open to the operator role when viewers log in.
fn media_factory(launch: &str, logins: bool) -> RTSPMediaFactory {
    let factory = RTSPMediaFactory::new();
    factory.set_launch(launch);
    factory.set_shared(true);
    if logins {
        factory.add_role_from_structure(
            &gst::Structure::builder(ROLE)
                .field(gstreamer_rtsp_server::RTSP_PERM_MEDIA_FACTORY_ACCESS, true)
                .field(
                    gstreamer_rtsp_server::RTSP_PERM_MEDIA_FACTORY_CONSTRUCT,
                    true,
                )
                .build(),
        );
    }
    factory
}

/// Connects `mount` to the media `factory` makes: while the media is prepared (someone
/// watches), the mount holds its appsrc and banner, and each frame's text is set on
/// `textoverlay` as that frame reaches it.
fn serve_into(factory: &RTSPMediaFactory, m: Arc<Mount>) {
    factory.connect_media_configure(move |_, media| {
        let Some(bin) = media.element().downcast::<gst::Bin>().ok() else {
            return;
        };
        let src = bin.by_name("src").and_then(|e| e.downcast::<AppSrc>().ok());
        let banner = bin.by_name("banner");
        if let (Some(src), Some(banner), Ok(mut live)) = (src, banner, m.live.lock()) {
            let texts = Texts::default();
            let found = texts.clone();
            // Weak: the probe lives on the element's own pad.
            let overlay = banner.downgrade();
            if let Some(pad) = banner.static_pad("video_sink") {
                pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                    let pts = info.buffer().and_then(|b| b.pts());
                    let text = pts.and_then(|t| found.lock().ok()?.remove(&t));
                    if let (Some(text), Some(o)) = (text, overlay.upgrade()) {
                        o.set_property("text", text);
                    }
                    gst::PadProbeReturn::Ok
                });
            }
            *live = Some(Live {
                src,
                banner: banner.clone(),
                texts,
                size: None,
            });
            tracing::info!(camera = %m.id, "operator view: a viewer connected");
        }
        let gone = m.clone();
        media.connect_unprepared(move |_| {
            if let Ok(mut live) = gone.live.lock() {
                *live = None;
            }
            tracing::info!(camera = %gone.id, "operator view: no viewer left");
        });
    });
}

impl Server {
    /// Stops the main loop and waits for its thread; false if the thread panicked.
    fn shutdown(&mut self) -> bool {
        // Quit from inside the loop: a quit() before the thread has entered run() is
        // forgotten, and the thread would then run forever.
        let l = self.main_loop.clone();
        self.main_loop.context().invoke(move || l.quit());
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(_)) => {
                tracing::error!("operator view: the RTSP thread panicked while stopping");
                false
            }
            _ => true,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Servers come and go with reloads: each one's thread ends cleanly (it used to
    /// panic removing its listening source from the wrong main context).
    #[test]
    fn servers_stop_cleanly_one_after_another() {
        gst::init().unwrap();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let cfg = RtspConfig {
                enabled: true,
                port,
                ..Default::default()
            };
            let camera = super::super::ViewedCamera {
                id: "cam1".into(),
                fps: 10.0,
                shown: true,
            };
            let mut server = Server::start(&cfg, &BTreeMap::new(), &[camera]).unwrap();
            assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
            assert!(server.shutdown(), "the RTSP thread panicked");
        }
    }
}
