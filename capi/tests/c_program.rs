//! Compiles `tests/c/alerts.c` with the system C compiler against the built cdylib, runs
//! it on real stills from `data/footage` and one of them flipped upside down, and checks
//! its output: results, alerts through the callback, and the error paths.
//!
//! `cargo test -p daain-capi` (and `cargo test --workspace`) builds the library target
//! before the tests because they depend on its `rlib`, and that one rustc run also writes
//! `libdaain_capi.so` into the `deps` directory next to this test's executable, without a
//! hash in its name. The library is found from `std::env::current_exe` that way.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use daain::source::{open_path, Frame, SourceOptions};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// Returns the directory that contains `libdaain_capi.so`: the `deps` directory of this
/// test executable.
fn library_dir() -> PathBuf {
    // The program checks the ABI version the header declares against this value too.
    assert_eq!(
        daain_capi::ABI_VERSION,
        1,
        "update DAAIN_ABI_VERSION in daain.h"
    );
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("test executable has a directory");
    let library = deps.join(format!(
        "{}daain_capi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        library.is_file(),
        "{} not found: run the test through cargo, which builds the cdylib first",
        library.display()
    );
    deps.to_owned()
}

fn decode(path: &Path) -> Frame {
    let mut source = open_path(path, &SourceOptions::default()).expect("still opens");
    let mut frame = Frame::new();
    assert!(source.next_frame(&mut frame).expect("still decodes"));
    frame
}

fn vertical_flip(frame: &Frame) -> Frame {
    let mut out = frame.clone();
    let stride = frame.width * 3;
    for y in 0..frame.height {
        let target = (frame.height - 1 - y) * stride;
        out.data[target..target + stride]
            .copy_from_slice(&frame.data[y * stride..(y + 1) * stride]);
    }
    out
}

/// Writes each frame as raw RGB24 and a list of `NAME PATH WIDTH HEIGHT` lines.
fn write_frames(dir: &Path, frames: &[(&str, Frame)]) -> PathBuf {
    let mut list = String::new();
    for (name, frame) in frames {
        let path = dir.join(format!("{name}.rgb"));
        std::fs::write(&path, &frame.data).unwrap();
        list.push_str(&format!(
            "{name} {} {} {}\n",
            path.display(),
            frame.width,
            frame.height
        ));
    }
    let list_path = dir.join("frames.txt");
    std::fs::write(&list_path, list).unwrap();
    list_path
}

fn compiler(variable: &str, default: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| default.to_owned())
}

fn check_output(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Returns the `key=value` field of a line of the program's output.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    line.split(' ')
        .find_map(|part| part.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn c_program_scores_frames_and_receives_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let curve = decode(&repo_path("data/footage/solidWhiteCurve.jpg"));
    // solidWhiteCurve scores below the default bundle's threshold and its flipped copy far
    // above, so the level rises on frame 1 and falls back on frame 2. solidYellowCurve,
    // a still of another road, adds a frame of another size.
    let frames = [
        ("solidWhiteCurve", curve.clone()),
        ("flippedWhiteCurve", vertical_flip(&curve)),
        ("solidWhiteCurveAgain", curve),
        (
            "solidYellowCurve",
            decode(&repo_path("data/footage/solidYellowCurve.jpg")),
        ),
    ];
    let list = write_frames(dir.path(), &frames);

    let library = library_dir();
    let program = dir.path().join("alerts");
    let compiled = Command::new(compiler("CC", "cc"))
        .args(["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-I"])
        .arg(repo_path("capi/include"))
        .arg(repo_path("capi/tests/c/alerts.c"))
        .arg("-o")
        .arg(&program)
        .arg("-L")
        .arg(&library)
        .arg(format!("-Wl,-rpath,{}", library.display()))
        .args(["-ldaain_capi", "-lm"])
        .output()
        .expect("the C compiler runs (set CC to choose one)");
    check_output("compiling alerts.c", &compiled);

    let missing = dir.path().join("no-such-bundle");
    let output = Command::new(&program)
        .arg(repo_path("models/default"))
        .arg(repo_path("configs/default.toml"))
        .arg(&list)
        .arg(&missing)
        .output()
        .expect("the compiled program runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("{stdout}");
    check_output("alerts", &output);

    let failed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("check FAIL"))
        .collect();
    assert!(failed.is_empty(), "failed checks: {failed:?}");
    let results: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("result "))
        .collect();
    assert_eq!(
        results.len(),
        frames.len() + 1,
        "one result per frame plus the padded one"
    );
    let flipped = results
        .iter()
        .find(|l| field(l, "name") == "flippedWhiteCurve")
        .expect("flipped frame scored");
    assert_eq!(field(flipped, "anomalous"), "1", "{flipped}");
    assert_eq!(field(flipped, "level"), "WARN", "{flipped}");

    let alerts: Vec<&str> = stdout.lines().filter(|l| l.starts_with("alert ")).collect();
    let rise = alerts
        .iter()
        .find(|l| field(l, "level") == "WARN" && field(l, "previous") == "OK")
        .expect("an alert for the rise to WARN");
    assert_eq!(
        field(rise, "frame"),
        "1",
        "the flipped frame raises the level: {rise}"
    );
    let fall = alerts
        .iter()
        .find(|l| field(l, "level") == "OK" && field(l, "previous") == "WARN")
        .expect("an alert for the return to OK");
    assert_eq!(
        field(fall, "frame"),
        "2",
        "the upright frame clears the level: {fall}"
    );
    let upright = results
        .iter()
        .find(|l| field(l, "name") == "solidWhiteCurve")
        .expect("upright frame scored");
    assert_eq!(field(upright, "level"), "OK", "{upright}");

    let missing_bundle = stdout
        .lines()
        .find(|l| l.starts_with("error missing_bundle"))
        .expect("missing bundle reported");
    assert!(
        missing_bundle.contains("DAAIN_ERROR_BUNDLE"),
        "{missing_bundle}"
    );
    assert!(
        missing_bundle.contains(&missing.display().to_string()),
        "{missing_bundle}"
    );
    assert!(stdout.contains("summary frames=4"), "{stdout}");
}

#[test]
fn header_compiles_as_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("use_header.cpp");
    std::fs::write(
        &source,
        "#include \"daain.h\"\n\
         static_assert(DAAIN_ABI_VERSION == 1u, \"ABI version\");\n\
         int main() {\n\
             daain_result result{};\n\
             daain_alert_callback callback = nullptr;\n\
             auto score = &daain_score_rgb;\n\
             (void)callback;\n\
             (void)score;\n\
             return static_cast<int>(result.level);\n\
         }\n",
    )
    .unwrap();
    let output = match Command::new(compiler("CXX", "c++"))
        .args([
            "-std=c++11",
            "-Wall",
            "-Wextra",
            "-pedantic",
            "-Werror",
            "-fsyntax-only",
            "-I",
        ])
        .arg(repo_path("capi/include"))
        .arg(&source)
        .output()
    {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // NOTE: a machine without a C++ compiler skips this check.
            eprintln!("no C++ compiler found (set CXX to choose one): header not checked as C++");
            return;
        }
        Err(error) => panic!("the C++ compiler failed to start: {error}"),
    };
    check_output("compiling daain.h as C++", &output);
}
