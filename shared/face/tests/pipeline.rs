//! The face pipeline on the vendored models and the committed test photos.

use std::{path::PathBuf, sync::OnceLock};

use face::{cosine, FaceConfig, FaceEngine, FaceError, Gates, Refusal};

fn engine() -> &'static FaceEngine {
    static ENGINE: OnceLock<FaceEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        FaceEngine::load_default(FaceConfig::default()).expect("vendored models load")
    })
}

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn embed(name: &str) -> Vec<f32> {
    let a = engine().analyze(&fixture(name), Gates::EmbedOnly).unwrap();
    a.embedding
        .unwrap_or_else(|| panic!("{name}: {:?}", a.refusal))
}

#[test]
fn same_person_matches_and_another_does_not() {
    let a1 = embed("person-a-1.jpg");
    assert_eq!(a1.len(), 128);
    assert!(
        (a1.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4,
        "L2-normalised"
    );
    let same = cosine(&a1, &embed("person-a-2.jpg"));
    let other = cosine(&a1, &embed("person-b.jpg"));
    assert!(engine().is_match(same), "same person scored {same}");
    assert!(!engine().is_match(other), "different people scored {other}");
}

#[test]
fn live_face_passes_every_gate() {
    let a = engine().analyze(&fixture("live.jpg"), Gates::All).unwrap();
    assert_eq!(a.refusal, None, "{a:?}");
    assert!(a.liveness.as_ref().unwrap().fused > 0.9);
    assert!(a.embedding.is_some());
    let q = a.quality.unwrap();
    assert!(q.face_px > 100.0 && q.sharpness > 100.0 && q.yaw_ratio.abs() < 0.3);
}

#[test]
fn photo_and_screen_attacks_are_refused() {
    for name in ["spoof-photo.jpg", "spoof-screen.jpg"] {
        let a = engine().analyze(&fixture(name), Gates::All).unwrap();
        assert_eq!(
            a.refusal,
            Some(Refusal::NotLive),
            "{name}: {:?}",
            a.liveness
        );
        assert!(a.embedding.is_none(), "a refused face is not embedded");
    }
}

#[test]
fn two_similar_faces_are_ambiguous() {
    let a = engine()
        .analyze(&fixture("two-faces.jpg"), Gates::All)
        .unwrap();
    assert!(a.faces_found >= 2);
    assert_eq!(a.refusal, Some(Refusal::MultipleFaces));
}

#[test]
fn face_cut_by_the_border_is_refused() {
    let a = engine()
        .analyze(&fixture("cut-by-border.jpg"), Gates::All)
        .unwrap();
    assert!(
        matches!(
            a.refusal,
            Some(
                Refusal::FaceCutByBorder
                    | Refusal::NoFace
                    | Refusal::ImplausibleLandmarks
                    | Refusal::HeadTurned
            )
        ),
        "{:?}",
        a.refusal
    );
    assert!(a.embedding.is_none());
}

#[test]
fn no_face_is_a_refusal_not_an_error() {
    let blank = image::RgbImage::from_pixel(320, 240, image::Rgb([90, 120, 150]));
    let a = engine().analyze_image(&blank, Gates::All).unwrap();
    assert_eq!((a.faces_found, a.refusal), (0, Some(Refusal::NoFace)));
}

#[test]
fn formats_are_recognised_by_content() {
    // A WebP file named .jpg, a CMYK JPEG, an EXIF-rotated JPEG: all decode and find the face.
    assert!(engine()
        .analyze(&fixture("webp-named-jpg.jpg"), Gates::EmbedOnly)
        .unwrap()
        .embedding
        .is_some());
    let cmyk = engine()
        .analyze(&fixture("cmyk.jpg"), Gates::EmbedOnly)
        .unwrap();
    assert!(cmyk.embedding.is_some(), "{:?}", cmyk.refusal);
    // live.jpg is stored sideways (640x480) with EXIF orientation 6: upright it is 480x640.
    let rotated = engine().analyze(&fixture("live.jpg"), Gates::All).unwrap();
    assert_eq!(
        (rotated.width, rotated.height),
        (480, 640),
        "orientation applied"
    );
    assert_eq!(rotated.refusal, None, "{:?}", rotated.quality);
}

#[test]
fn grayscale_sixteen_bit_and_alpha_inputs_work() {
    let live =
        image::DynamicImage::ImageRgb8(face::decode::decode_rgb(&fixture("live.jpg")).unwrap());
    let encode = |img: image::DynamicImage| {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    for (what, img) in [
        (
            "grayscale",
            image::DynamicImage::ImageLuma8(live.to_luma8()),
        ),
        ("16-bit", image::DynamicImage::ImageRgb16(live.to_rgb16())),
        ("alpha", image::DynamicImage::ImageRgba8(live.to_rgba8())),
    ] {
        let a = engine().analyze(&encode(img), Gates::EmbedOnly).unwrap();
        assert!(a.embedding.is_some(), "{what}: {:?}", a.refusal);
    }
}

#[test]
fn bad_files_are_typed_errors() {
    let e = engine();
    assert_eq!(e.analyze(b"", Gates::All).unwrap_err(), FaceError::Empty);
    assert_eq!(
        e.analyze(b"hello, I am a text file", Gates::All)
            .unwrap_err(),
        FaceError::NotAnImage
    );
    let live = fixture("live.jpg");
    assert!(matches!(
        e.analyze(&live[..live.len() / 2], Gates::All).unwrap_err(),
        FaceError::Corrupt(_)
    ));
    assert_eq!(
        e.analyze(&fixture("huge-30000.png"), Gates::All)
            .unwrap_err(),
        FaceError::TooLarge {
            width: 30000,
            height: 30000,
            max: face::decode::MAX_IMAGE_SIDE
        }
    );
}

#[test]
fn the_engine_is_safe_to_share_across_threads() {
    let live = fixture("live.jpg");
    let expected = engine()
        .analyze(&live, Gates::EmbedOnly)
        .unwrap()
        .embedding
        .unwrap();
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                let got = engine()
                    .analyze(&live, Gates::EmbedOnly)
                    .unwrap()
                    .embedding
                    .unwrap();
                assert!(cosine(&got, &expected) > 0.9999);
            });
        }
    });
}

#[test]
fn config_validation_names_keys() {
    assert!(FaceConfig::default().validate("face").is_ok());
    let bad = FaceConfig {
        liveness_threshold: 1.5,
        ..FaceConfig::default()
    };
    assert_eq!(
        bad.validate("face").unwrap_err().0,
        "face.liveness_threshold"
    );
}

#[test]
fn workers_answer_async_callers_from_their_own_threads() {
    let engine = std::sync::Arc::new(FaceEngine::load_default(FaceConfig::default()).unwrap());
    let live = fixture("live.jpg");
    actix::System::new().block_on(async move {
        let workers = face::worker::start_workers(engine, 2);
        let asks = (0..3).map(|_| {
            workers.send(face::worker::AnalyzeFace {
                image: live.clone(),
                gates: Gates::All,
            })
        });
        for answer in await_all(asks).await {
            let analysis = answer.expect("worker alive").expect("analysed");
            assert_eq!(analysis.refusal, None);
        }
        let bad = workers
            .send(face::worker::AnalyzeFace {
                image: vec![],
                gates: Gates::All,
            })
            .await
            .unwrap();
        assert_eq!(bad.unwrap_err(), FaceError::Empty);
    });
}

async fn await_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    let pending: Vec<F> = futures.collect();
    for f in pending {
        out.push(f.await);
    }
    out
}
