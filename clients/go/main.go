// carrecog-go: the Go twin of `python -m client`.
//
//	bin/carrecog-go [--address HOST:PORT] [--ca CA.pem [--cert C.pem --key K.pem]] IMAGE_OR_FOLDER...
//
// Built by `make clients` in GOPATH mode against Debian's Go packages; the
// stubs (package carrecog/v1) are generated from protos/ into build/go at build
// time. Prints one JSON object per image with the python client's field names
// and formatting; a failed image prints {"image", "error": {"code", "message"}}
// and the command exits 1 after the others are done.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io/ioutil"
	"math"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	pb "carrecog/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

const maxMessage = 64 << 20

// codeNames are grpc status code names as python's grpc.StatusCode spells them.
var codeNames = []string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
	"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
	"UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}

// number is one number of --box, as every client reads it: plain decimal, optional sign and exponent.
var number = regexp.MustCompile(`^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$`)

// parseBox reads --box x_min,y_min,x_max,y_max: four finite numbers (their range is the router's to check).
func parseBox(text string) (*pb.Box, bool) {
	parts := strings.Split(text, ",")
	if len(parts) != 4 {
		return nil, false
	}
	var v [4]float64
	for i, part := range parts {
		part = strings.Trim(part, " ")
		if !number.MatchString(part) {
			return nil, false
		}
		x, err := strconv.ParseFloat(part, 64)
		if err != nil || math.IsInf(x, 0) || math.IsNaN(x) {
			return nil, false
		}
		v[i] = x
	}
	return &pb.Box{XMin: float32(v[0]), YMin: float32(v[1]), XMax: float32(v[2]), YMax: float32(v[3])}, true
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

// clean reads a path as pathlib prints it: no empty or "." components ("./a//b.jpg" -> "a/b.jpg").
func clean(raw string) string {
	var kept []string
	for i, part := range strings.Split(raw, "/") {
		if part == "." || (part == "" && i > 0) {
			continue
		}
		kept = append(kept, part)
	}
	if s := strings.Join(kept, "/"); s != "" {
		return s
	}
	return "."
}

func isImage(name string) bool {
	dot := strings.LastIndex(name, ".")
	if dot <= 0 {
		return false
	}
	switch strings.ToLower(name[dot:]) {
	case ".jpg", ".jpeg", ".png":
		return true
	}
	return false
}

// expand keeps files as given; folders expand to their JPEG/PNG files, sorted per path component.
func expand(paths []string) []string {
	var found []string
	var walk func(dir string)
	walk = func(dir string) {
		f, err := os.Open(dir)
		if err != nil {
			return
		}
		names, _ := f.Readdirnames(-1)
		f.Close()
		sort.Strings(names)
		for _, name := range names {
			full := dir + "/" + name
			if dir == "." {
				full = name
			}
			st, err := os.Stat(full)
			if err != nil {
				continue
			}
			if st.IsDir() {
				walk(full)
			} else if isImage(name) {
				found = append(found, full)
			}
		}
	}
	for _, raw := range paths {
		if st, err := os.Stat(raw); err == nil && st.IsDir() {
			walk(clean(raw))
		} else {
			found = append(found, clean(raw))
		}
	}
	return found
}

// JSON written as python's json.dumps writes it: ", " and ": " separators, ASCII only.
type jsonWriter struct{ strings.Builder }

func (w *jsonWriter) str(s string) {
	w.WriteByte('"')
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1: // an undecodable byte, as python's surrogateescape shows it
			fmt.Fprintf(w, "\\u%04x", 0xdc00+int(s[i]))
		case r == '"':
			w.WriteString("\\\"")
		case r == '\\':
			w.WriteString("\\\\")
		case r == '\n':
			w.WriteString("\\n")
		case r == '\r':
			w.WriteString("\\r")
		case r == '\t':
			w.WriteString("\\t")
		case r == '\b':
			w.WriteString("\\b")
		case r == '\f':
			w.WriteString("\\f")
		case r < 0x20 || (r >= 0x7f && r < 0x10000):
			fmt.Fprintf(w, "\\u%04x", r)
		case r >= 0x10000:
			r -= 0x10000
			fmt.Fprintf(w, "\\u%04x\\u%04x", 0xd800+(r>>10), 0xdc00+(r&0x3ff))
		default:
			w.WriteRune(r)
		}
		i += size
	}
	w.WriteByte('"')
}

// num writes round(x, digits) as python prints it (shortest form, at least one decimal).
func (w *jsonWriter) num(x float64, digits int) {
	s := strconv.FormatFloat(x, 'f', digits, 64)
	s = strings.TrimRight(s, "0")
	if strings.HasSuffix(s, ".") {
		s += "0"
	}
	w.WriteString(s)
}

func (w *jsonWriter) key(k string, first bool) {
	if !first {
		w.WriteString(", ")
	}
	w.str(k)
	w.WriteString(": ")
}

func toJSON(image string, r *pb.RecognizeResponse) string {
	var w jsonWriter
	w.WriteByte('{')
	w.key("image", true)
	w.str(image)
	w.key("make", false)
	w.str(r.Make)
	w.key("model", false)
	w.str(r.Model)
	w.key("year", false)
	w.WriteString(strconv.Itoa(int(r.Year)))
	w.key("label", false)
	w.str(r.Label)
	w.key("confidence", false)
	w.num(float64(r.Confidence), 4)
	w.key("make_confidence", false)
	w.num(float64(r.MakeConfidence), 4)
	w.key("route", false)
	w.str(strings.ToLower(strings.TrimPrefix(r.Route.String(), "ROUTE_")))
	w.key("route_detail", false)
	w.str(r.RouteDetail)
	w.key("box", false)
	w.WriteByte('{')
	box := r.GetBox()
	w.key("x_min", true)
	w.num(float64(box.GetXMin()), 4)
	w.key("y_min", false)
	w.num(float64(box.GetYMin()), 4)
	w.key("x_max", false)
	w.num(float64(box.GetXMax()), 4)
	w.key("y_max", false)
	w.num(float64(box.GetYMax()), 4)
	w.key("score", false)
	w.num(float64(r.BoxScore), 4)
	w.WriteByte('}')
	w.key("cars_found", false)
	w.WriteString(strconv.Itoa(int(r.CarsFound)))
	w.key("framing", false)
	w.str(strings.ToLower(strings.TrimPrefix(r.Framing.String(), "FRAMING_")))
	w.key("verdict", false)
	w.str(strings.ToLower(strings.TrimPrefix(r.Verdict.String(), "VERDICT_")))
	w.key("verdict_score", false)
	w.num(float64(r.VerdictScore), 4)
	w.key("verdict_threshold", false)
	w.num(float64(r.VerdictThreshold), 4)
	w.key("model_name", false)
	w.str(r.ModelName)
	w.key("model_version", false)
	w.WriteString(strconv.FormatInt(r.ModelVersion, 10))
	w.key("logo", false)
	if r.Logo != nil && r.Logo.Brand != "" {
		w.WriteByte('{')
		w.key("brand", true)
		w.str(r.Logo.Brand)
		w.key("inliers", false)
		w.WriteString(strconv.Itoa(int(r.Logo.Inliers)))
		w.key("matched", false)
		w.WriteString(strconv.FormatBool(r.LogoMatched))
		w.WriteByte('}')
	} else {
		w.WriteString("null")
	}
	w.key("top_k", false)
	w.WriteByte('[')
	for i, p := range r.TopK {
		if i > 0 {
			w.WriteString(", ")
		}
		w.WriteByte('{')
		w.key("label", true)
		w.str(p.Label)
		w.key("confidence", false)
		w.num(float64(p.Confidence), 4)
		w.WriteByte('}')
	}
	w.WriteByte(']')
	w.key("ms", false)
	w.WriteByte('{')
	seen := map[string]bool{}
	for _, t := range r.Timings { // a dict: a repeated stage keeps its first place and its last value
		if seen[t.Stage] {
			continue
		}
		seen[t.Stage] = true
		ms := t.Ms
		for _, later := range r.Timings {
			if later.Stage == t.Stage {
				ms = later.Ms
			}
		}
		w.key(t.Stage, len(seen) == 1)
		w.num(ms, 1)
	}
	w.WriteString("}}")
	return w.String()
}

func errorJSON(image, code, message string) string {
	var w jsonWriter
	w.WriteByte('{')
	w.key("image", true)
	w.str(image)
	w.key("error", false)
	w.WriteByte('{')
	w.key("code", true)
	w.str(code)
	w.key("message", false)
	w.str(message)
	w.WriteString("}}")
	return w.String()
}

func transport(ca, cert, key string) (grpc.DialOption, error) {
	if ca == "" {
		return grpc.WithInsecure(), nil
	}
	pem, err := ioutil.ReadFile(ca)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificate in %s", ca)
	}
	config := &tls.Config{RootCAs: pool, NextProtos: []string{"h2"}}
	if cert != "" || key != "" {
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(config)), nil
}

func usageError(format string, args ...interface{}) {
	flag.Usage()
	fmt.Fprintf(os.Stderr, "carrecog-go: error: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	address := flag.String("address", envOr("ROUTER_ADDRESS", "localhost:50050"), "router host:port ($ROUTER_ADDRESS)")
	topK := flag.Int("top-k", 5, "how many ranked predictions")
	skipLogo := flag.Bool("skip-logo", false, "go straight to the global model")
	model := flag.String("model", "", "force a TF Serving model by name")
	boxText := flag.String("box", "", "X_MIN,Y_MIN,X_MAX,Y_MAX: the car's box in every image, in fractions of\n"+
		"width and height (the router crops and classifies it, no localisation)")
	skipLocalization := flag.Bool("skip-localization", false, "classify the whole photo, no crop")
	timeout := flag.Float64("timeout", 30, "deadline per image in seconds")
	ca := flag.String("ca", os.Getenv("ROUTER_TLS_CA"), "CA PEM: use TLS ($ROUTER_TLS_CA)")
	cert := flag.String("cert", os.Getenv("ROUTER_TLS_CLIENT_CERT"), "client cert for mTLS")
	key := flag.String("key", os.Getenv("ROUTER_TLS_CLIENT_KEY"), "client key for mTLS")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: carrecog-go [flags] IMAGE_OR_FOLDER...\n")
		flag.PrintDefaults()
	}
	// Flags may follow the images, as with argparse.
	var positional []string
	args := os.Args[1:]
	for {
		if err := flag.CommandLine.Parse(args); err != nil {
			os.Exit(2)
		}
		if flag.NArg() == 0 {
			break
		}
		positional = append(positional, flag.Arg(0))
		args = flag.Args()[1:]
	}
	var carBox *pb.Box
	boxSet := false
	flag.Visit(func(f *flag.Flag) { boxSet = boxSet || f.Name == "box" })
	if boxSet {
		var ok bool
		if carBox, ok = parseBox(*boxText); !ok {
			usageError("argument --box: expected x_min,y_min,x_max,y_max (four numbers, fractions of the width "+
				"and height), got %q", *boxText)
		}
	}
	if len(positional) == 0 {
		usageError("the following arguments are required: images")
	}
	images := expand(positional)
	if len(images) == 0 {
		usageError("no JPEG or PNG files found in the given paths")
	}
	creds, err := transport(*ca, *cert, *key)
	if err != nil {
		fmt.Fprintf(os.Stderr, "carrecog-go: %v\n", err)
		os.Exit(2)
	}
	conn, err := grpc.Dial(*address, creds, grpc.WithDefaultCallOptions(
		grpc.MaxCallSendMsgSize(maxMessage), grpc.MaxCallRecvMsgSize(maxMessage)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "carrecog-go: %v\n", err)
		os.Exit(2)
	}
	defer conn.Close()
	client := pb.NewRecognitionServiceClient(conn)
	options := &pb.RecognizeOptions{TopK: int32(*topK), SkipLogo: *skipLogo, ForceModel: *model,
		SkipLocalization: *skipLocalization}

	failures := 0
	for _, image := range images {
		var line string
		data, err := ioutil.ReadFile(image)
		if err != nil {
			failures++
			line = errorJSON(image, "FILE_ERROR", err.Error())
		} else {
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(*timeout*float64(time.Second)))
			response, err := client.Recognize(ctx, &pb.RecognizeRequest{Image: data, ImageId: image, Options: options,
				CarBox: carBox})
			cancel()
			if err != nil {
				failures++
				st := status.Convert(err)
				code := "UNKNOWN"
				if int(st.Code()) < len(codeNames) {
					code = codeNames[st.Code()]
				}
				line = errorJSON(image, code, st.Message())
			} else {
				line = toJSON(image, response)
			}
		}
		fmt.Println(line)
	}
	if failures > 0 {
		os.Exit(1)
	}
}
