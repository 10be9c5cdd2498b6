// carrecog-cpp: the C++ twin of `python -m client`.
//
//   bin/carrecog-cpp [--address HOST:PORT] [--ca CA.pem [--cert C.pem --key K.pem]] IMAGE_OR_FOLDER...
//
// Built by `make clients` against Debian's libgrpc++; the stubs are generated
// from protos/ into build/cpp at build time. Prints one JSON object per image
// with the python client's field names and formatting; a failed image prints
// {"image", "error": {"code", "message"}} and the command exits 1 after the
// others are done.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "carrecog/v1/recognition_service.grpc.pb.h"

namespace fs = std::filesystem;
namespace v1 = carrecog::v1;

namespace {

constexpr int kMaxMessage = 64 << 20;

const char* const kCodeNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                  "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                  "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                  "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value && *value ? value : fallback;
}

const char kUsage[] =
    "usage: carrecog-cpp [--address HOST:PORT] [--top-k N] [--skip-logo] [--model NAME]\n"
    "                    [--box X_MIN,Y_MIN,X_MAX,Y_MAX] [--skip-localization] [--timeout SECONDS]\n"
    "                    [--ca CA.pem] [--cert CERT.pem] [--key KEY.pem] IMAGE_OR_FOLDER...\n";

[[noreturn]] void UsageError(const std::string& message) {
  std::cerr << kUsage << "carrecog-cpp: error: " << message << "\n";
  std::exit(2);
}

// --box x_min,y_min,x_max,y_max: four finite numbers (their range is the router's to check); each
// number as every client reads it: plain decimal, optional sign and exponent.
std::optional<v1::Box> ParseBox(const std::string& text) {
  static const std::regex number(R"([+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)");
  std::vector<double> values;
  size_t start = 0;
  while (true) {
    size_t end = text.find(',', start);
    std::string part = text.substr(start, end == std::string::npos ? std::string::npos : end - start);
    size_t first = part.find_first_not_of(' '), last = part.find_last_not_of(' ');
    part = first == std::string::npos ? "" : part.substr(first, last - first + 1);
    if (!std::regex_match(part, number)) return std::nullopt;
    double value = std::strtod(part.c_str(), nullptr);
    if (!std::isfinite(value)) return std::nullopt;
    values.push_back(value);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  if (values.size() != 4) return std::nullopt;
  v1::Box box;
  box.set_x_min(static_cast<float>(values[0]));
  box.set_y_min(static_cast<float>(values[1]));
  box.set_x_max(static_cast<float>(values[2]));
  box.set_y_max(static_cast<float>(values[3]));
  return box;
}

// JSON written as python's json.dumps writes it: ", " and ": " separators, ASCII only
// (non-ASCII as \uXXXX, undecodable bytes as python's surrogateescape shows them).
void AppendHex(std::string& out, unsigned value) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "\\u%04x", value);
  out += buf;
}

std::string Quote(const std::string& s) {
  std::string out = "\"";
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size();
  for (size_t i = 0; i < n;) {
    unsigned char c = p[i];
    if (c < 0x80) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20 || c == 0x7f) AppendHex(out, c);
          else out += static_cast<char>(c);
      }
      i++;
      continue;
    }
    // Decode one UTF-8 sequence; anything malformed is one undecodable byte.
    int len = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c <= 0xdf ? 2 : 0;
    unsigned cp = len == 4 ? c & 0x07 : len == 3 ? c & 0x0f : c & 0x1f;
    bool ok = len > 0 && i + len <= n;
    for (int k = 1; ok && k < len; k++) {
      if ((p[i + k] & 0xc0) != 0x80) ok = false;
      else cp = (cp << 6) | (p[i + k] & 0x3f);
    }
    if (ok && ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff))))
      ok = false;
    if (!ok) {
      AppendHex(out, 0xdc00 + c);
      i++;
      continue;
    }
    if (cp >= 0x10000) {
      cp -= 0x10000;
      AppendHex(out, 0xd800 + (cp >> 10));
      AppendHex(out, 0xdc00 + (cp & 0x3ff));
    } else {
      AppendHex(out, cp);
    }
    i += len;
  }
  return out + "\"";
}

// round(x, digits) as python prints it: shortest form, at least one decimal.
std::string Number(double x, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, x);
  std::string s = buf;
  while (!s.empty() && s.back() == '0') s.pop_back();
  if (!s.empty() && s.back() == '.') s += '0';
  return s;
}

class Object {
 public:
  Object& Raw(const std::string& key, const std::string& value) {
    body_ += (body_.empty() ? "" : ", ") + Quote(key) + ": " + value;
    return *this;
  }
  Object& Str(const std::string& key, const std::string& value) { return Raw(key, Quote(value)); }
  std::string Done() const { return "{" + body_ + "}"; }

 private:
  std::string body_;
};

std::string ToJson(const std::string& image, const v1::RecognizeResponse& r) {
  std::string route = v1::Route_Name(r.route());
  if (route.rfind("ROUTE_", 0) == 0) route = route.substr(6);
  std::transform(route.begin(), route.end(), route.begin(), [](unsigned char c) { return std::tolower(c); });
  std::string framing = v1::Framing_Name(r.framing());
  if (framing.rfind("FRAMING_", 0) == 0) framing = framing.substr(8);
  std::transform(framing.begin(), framing.end(), framing.begin(), [](unsigned char c) { return std::tolower(c); });
  std::string verdict = v1::Verdict_Name(r.verdict());
  if (verdict.rfind("VERDICT_", 0) == 0) verdict = verdict.substr(8);
  std::transform(verdict.begin(), verdict.end(), verdict.begin(), [](unsigned char c) { return std::tolower(c); });
  std::string box = Object()
                        .Raw("x_min", Number(r.box().x_min(), 4))
                        .Raw("y_min", Number(r.box().y_min(), 4))
                        .Raw("x_max", Number(r.box().x_max(), 4))
                        .Raw("y_max", Number(r.box().y_max(), 4))
                        .Raw("score", Number(r.box_score(), 4))
                        .Done();
  std::string logo = "null";
  if (!r.logo().brand().empty())
    logo = Object()
               .Str("brand", r.logo().brand())
               .Raw("inliers", std::to_string(r.logo().inliers()))
               .Raw("matched", r.logo_matched() ? "true" : "false")
               .Done();
  std::string top_k = "[";
  for (int i = 0; i < r.top_k_size(); i++) {
    if (i) top_k += ", ";
    top_k += Object().Str("label", r.top_k(i).label()).Raw("confidence", Number(r.top_k(i).confidence(), 4)).Done();
  }
  top_k += "]";
  // A python dict: a repeated stage keeps its first place and its last value.
  std::vector<std::string> stages;
  std::map<std::string, double> ms;
  for (const auto& t : r.timings()) {
    if (!ms.count(t.stage())) stages.push_back(t.stage());
    ms[t.stage()] = t.ms();
  }
  Object timings;
  for (const auto& stage : stages) timings.Raw(stage, Number(ms[stage], 1));
  return Object()
      .Str("image", image)
      .Str("make", r.make())
      .Str("model", r.model())
      .Raw("year", std::to_string(r.year()))
      .Str("label", r.label())
      .Raw("confidence", Number(r.confidence(), 4))
      .Raw("make_confidence", Number(r.make_confidence(), 4))
      .Str("route", route)
      .Str("route_detail", r.route_detail())
      .Raw("box", box)
      .Raw("cars_found", std::to_string(r.cars_found()))
      .Str("framing", framing)
      .Str("verdict", verdict)
      .Raw("verdict_score", Number(r.verdict_score(), 4))
      .Raw("verdict_threshold", Number(r.verdict_threshold(), 4))
      .Str("model_name", r.model_name())
      .Raw("model_version", std::to_string(r.model_version()))
      .Raw("logo", logo)
      .Raw("top_k", top_k)
      .Raw("ms", timings.Done())
      .Done();
}

std::string ErrorJson(const std::string& image, const std::string& code, const std::string& message) {
  return Object().Str("image", image).Raw("error", Object().Str("code", code).Str("message", message).Done()).Done();
}

bool ReadFile(const std::string& path, std::string* data, std::string* error) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    *error = "Is a directory: '" + path + "'";
    return false;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = std::string(std::strerror(errno)) + ": '" + path + "'";
    return false;
  }
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) {
    *error = "read error: '" + path + "'";
    return false;
  }
  *data = buf.str();
  return true;
}

// A path as pathlib prints it: no empty or "." components ("./a//b.jpg" -> "a/b.jpg").
std::string Clean(const std::string& raw) {
  std::string out;
  size_t start = 0;
  bool first = true;
  while (start <= raw.size()) {
    size_t end = raw.find('/', start);
    if (end == std::string::npos) end = raw.size();
    std::string part = raw.substr(start, end - start);
    if (first && part.empty()) out = "/";
    else if (!part.empty() && part != ".") out += (out.empty() || out == "/" ? "" : "/") + part;
    first = false;
    start = end + 1;
  }
  return out.empty() ? "." : out;
}

bool IsImage(const std::string& name) {
  size_t dot = name.rfind('.');
  if (dot == std::string::npos || dot == 0) return false;
  std::string suffix = name.substr(dot);
  std::transform(suffix.begin(), suffix.end(), suffix.begin(), [](unsigned char c) { return std::tolower(c); });
  return suffix == ".jpg" || suffix == ".jpeg" || suffix == ".png";
}

// Files as given; folders expand to their JPEG/PNG files, sorted per path component.
void Walk(const std::string& dir, std::vector<std::string>* found) {
  std::error_code ec;
  std::vector<std::string> names;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    names.push_back(it->path().filename().string());
  std::sort(names.begin(), names.end());
  for (const auto& name : names) {
    std::string full = dir == "." ? name : dir + "/" + name;
    if (fs::is_directory(full, ec)) Walk(full, found);
    else if (IsImage(name) && fs::exists(full, ec)) found->push_back(full);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string address = EnvOr("ROUTER_ADDRESS", "localhost:50050");
  std::string ca = EnvOr("ROUTER_TLS_CA", ""), cert = EnvOr("ROUTER_TLS_CLIENT_CERT", "");
  std::string key = EnvOr("ROUTER_TLS_CLIENT_KEY", ""), model;
  int top_k = 5;
  bool skip_logo = false, skip_localization = false;
  std::optional<v1::Box> car_box;
  double timeout = 30;
  std::vector<std::string> paths;
  for (int i = 1; i < argc; i++) {
    std::string arg = argv[i], value;
    bool has_value = false;
    size_t eq = arg.find('=');
    if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    auto next = [&]() -> std::string {
      if (has_value) return value;
      if (i + 1 >= argc) UsageError("argument " + arg + ": expected one argument");
      return argv[++i];
    };
    try {
      if (arg == "-h" || arg == "--help") {
        std::cout << kUsage;
        return 0;
      } else if (arg == "--address") address = next();
      else if (arg == "--ca") ca = next();
      else if (arg == "--cert") cert = next();
      else if (arg == "--key") key = next();
      else if (arg == "--model") model = next();
      else if (arg == "--top-k") top_k = std::stoi(next());
      else if (arg == "--timeout") timeout = std::stod(next());
      else if (arg == "--skip-logo") skip_logo = true;
      else if (arg == "--skip-localization") skip_localization = true;
      else if (arg == "--box") {
        std::string text = next();
        car_box = ParseBox(text);
        if (!car_box)
          UsageError("argument --box: expected x_min,y_min,x_max,y_max (four numbers, fractions of the width and "
                     "height), got " + Quote(text));
      }
      else if (arg.rfind("--", 0) == 0) UsageError("unrecognized arguments: " + arg);
      else paths.push_back(argv[i]);
    } catch (const std::logic_error&) {
      UsageError("argument " + arg + ": not a number");
    }
  }
  if (paths.empty()) UsageError("the following arguments are required: images");
  std::vector<std::string> images;
  for (const auto& raw : paths) {
    std::error_code ec;
    if (fs::is_directory(raw, ec)) Walk(Clean(raw), &images);
    else images.push_back(Clean(raw));
  }
  if (images.empty()) UsageError("no JPEG or PNG files found in the given paths");

  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!ca.empty()) {
    grpc::SslCredentialsOptions ssl;
    std::string error;
    bool ok = ReadFile(ca, &ssl.pem_root_certs, &error);
    if (ok && !cert.empty()) ok = ReadFile(cert, &ssl.pem_cert_chain, &error);
    if (ok && !key.empty()) ok = ReadFile(key, &ssl.pem_private_key, &error);
    if (!ok) {
      std::cerr << "carrecog-cpp: " << error << "\n";
      return 2;
    }
    credentials = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxSendMessageSize(kMaxMessage);
  channel_args.SetMaxReceiveMessageSize(kMaxMessage);
  auto stub = v1::RecognitionService::NewStub(grpc::CreateCustomChannel(address, credentials, channel_args));

  v1::RecognizeOptions options;
  options.set_top_k(top_k);
  options.set_skip_logo(skip_logo);
  options.set_force_model(model);
  options.set_skip_localization(skip_localization);
  int failures = 0;
  for (const auto& image : images) {
    std::string line, data, error;
    if (!ReadFile(image, &data, &error)) {
      failures++;
      line = ErrorJson(image, "FILE_ERROR", error);
    } else {
      v1::RecognizeRequest request;
      request.set_image(std::move(data));
      request.set_image_id(image);
      *request.mutable_options() = options;
      if (car_box) *request.mutable_car_box() = *car_box;
      v1::RecognizeResponse response;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() +
                           std::chrono::microseconds(static_cast<long long>(timeout * 1e6)));
      grpc::Status status = stub->Recognize(&context, request, &response);
      if (status.ok()) {
        line = ToJson(image, response);
      } else {
        failures++;
        int code = status.error_code();
        line = ErrorJson(image, code >= 0 && code <= 16 ? kCodeNames[code] : "UNKNOWN", status.error_message());
      }
    }
    std::cout << line << std::endl;
  }
  return failures ? 1 : 0;
}
