package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// testPKI is a CA and the certificates it signed, written as PEM files.
type testPKI struct {
	dir    string
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	caFile string
	pool   *x509.CertPool
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "corral test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &testPKI{dir: t.TempDir(), ca: ca, caKey: key, pool: x509.NewCertPool()}
	p.pool.AddCert(ca)
	p.caFile = p.write(t, "ca.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	return p
}

func (p *testPKI) write(t *testing.T, name string, b []byte) string {
	t.Helper()
	path := filepath.Join(p.dir, name)
	// Written beside and renamed, as certbot and cert-manager replace files.
	if err := os.WriteFile(path+".tmp", b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
	return path
}

// issue writes a certificate for 127.0.0.1 named cn (a server's, or a
// client's) and its key; password, if set, encrypts the key the
// traditional PEM way.
func (p *testPKI) issue(t *testing.T, name, cn string, client bool, password string) (certFile, keyFile string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	certFile = p.certify(t, name, cn, client, &key.PublicKey)
	kder, _ := x509.MarshalECPrivateKey(key)
	block := &pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}
	if password != "" {
		var err error
		//lint:ignore SA1019 the traditional PEM encryption is what the server reads with a password
		block, err = x509.EncryptPEMBlock(rand.Reader, block.Type, kder, []byte(password), x509.PEMCipherAES256)
		if err != nil {
			t.Fatal(err)
		}
	}
	return certFile, p.write(t, name+".key", pem.EncodeToMemory(block))
}

// certify writes a certificate for 127.0.0.1 named cn for the public key
// pub, signed by the CA.
func (p *testPKI) certify(t *testing.T, name, cn string, client bool, pub any) string {
	t.Helper()
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
	}
	if client {
		tmpl.ExtKeyUsage, tmpl.IPAddresses = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, nil
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, pub, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	return p.write(t, name+".pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// tlsClient trusts the test CA, offers cert if given, and opens a new
// connection (a new handshake) for every request.
func (p *testPKI) tlsClient(cert *tls.Certificate, maxVersion uint16) *http.Client {
	cfg := &tls.Config{RootCAs: p.pool, MaxVersion: maxVersion}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true}}
}

// servedCN returns the common name of the certificate the server shows
// on a new connection, and the /health status.
func servedCN(c *http.Client, url string) (string, int, error) {
	resp, err := c.Get(url)
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.TLS.PeerCertificates[0].Subject.CommonName, resp.StatusCode, nil
}

// TestTLS serves /health over HTTPS to Go, curl and Python's ssl, with a
// password-protected key; refuses TLS 1.1; and asks for client
// certificates when told to.
func TestTLS(t *testing.T) {
	t.Parallel()
	pki := newTestPKI(t)
	cert, key := pki.issue(t, "server", "v1", false, "k3y pass")
	s := startServer(t, "WORKERS=2", "SSL_CERTFILE="+cert, "SSL_KEYFILE="+key, "SSL_KEYFILE_PASSWORD=k3y pass")
	url := "https://127.0.0.1:" + strconv.Itoa(s.port) + "/health"
	if run := s.logs.find("Corral running, press CTRL+C to quit", nil); !strings.HasPrefix(fmt.Sprint(run[0]["url"]), "https://") {
		t.Errorf("logged URL %v, want https://", run[0]["url"])
	}
	if cn, st, err := servedCN(pki.tlsClient(nil, 0), url); err != nil || st != 200 || cn != "v1" {
		t.Errorf("GET /health over TLS = %d, certificate %q, %v; want 200 from v1", st, cn, err)
	}
	if _, _, err := servedCN(pki.tlsClient(nil, tls.VersionTLS11), url); err == nil {
		t.Error("a TLS 1.1 client was served, want TLS 1.2 at least")
	}
	if _, err := exec.LookPath("curl"); err == nil {
		out, err := exec.Command("curl", "-sS", "--cacert", pki.caFile, url).CombinedOutput()
		if err != nil || !strings.Contains(string(out), `"status":"ok"`) {
			t.Errorf("curl %s: %v\n%s", url, err, out)
		}
	} else {
		t.Log("curl not installed: skipped")
	}
	if _, err := exec.LookPath("python3"); err == nil {
		prog := fmt.Sprintf(`
import http.client, ssl
ctx = ssl.create_default_context(cafile=%q)
c = http.client.HTTPSConnection("127.0.0.1", %d, context=ctx, timeout=10)
c.request("GET", "/health")
r = c.getresponse()
print(r.status, c.sock.version())
`, pki.caFile, s.port)
		out, err := exec.Command("python3", "-c", prog).CombinedOutput()
		if err != nil || !strings.HasPrefix(string(out), "200 TLSv1.") {
			t.Errorf("python3 ssl: %v\n%s", err, out)
		}
	} else {
		t.Log("python3 not installed: skipped")
	}
	s.stop()

	// Client certificates required.
	ccert, ckey := pki.issue(t, "client", "a client", true, "")
	clientCert, err := tls.LoadX509KeyPair(ccert, ckey)
	if err != nil {
		t.Fatal(err)
	}
	m := startServer(t, "WORKERS=1", "SSL_CERTFILE="+cert, "SSL_KEYFILE="+key, "SSL_KEYFILE_PASSWORD=k3y pass",
		"SSL_CA_CERTS="+pki.caFile, "SSL_CERT_REQS=2")
	url = "https://127.0.0.1:" + strconv.Itoa(m.port) + "/health"
	if _, _, err := servedCN(pki.tlsClient(nil, 0), url); err == nil {
		t.Error("a client without a certificate was served with SSL_CERT_REQS=2")
	}
	if _, st, err := servedCN(pki.tlsClient(&clientCert, 0), url); err != nil || st != 200 {
		t.Errorf("client with a certificate: %d, %v; want 200", st, err)
	}
	if _, err := exec.LookPath("curl"); err == nil {
		out, err := exec.Command("curl", "-sS", "--cacert", pki.caFile, "--cert", ccert, "--key", ckey, url).CombinedOutput()
		if err != nil || !strings.Contains(string(out), `"status":"ok"`) {
			t.Errorf("curl with a client certificate: %v\n%s", err, out)
		}
	}
	m.stop()

	// Client certificates optional: none is fine, one is verified when
	// given (one from another CA is refused).
	other := newTestPKI(t)
	strangerCert, err := tls.LoadX509KeyPair(other.issue(t, "stranger", "a stranger", true, ""))
	if err != nil {
		t.Fatal(err)
	}
	o := startServer(t, "WORKERS=1", "SSL_CERTFILE="+cert, "SSL_KEYFILE="+key, "SSL_KEYFILE_PASSWORD=k3y pass",
		"SSL_CA_CERTS="+pki.caFile, "SSL_CERT_REQS=1")
	url = "https://127.0.0.1:" + strconv.Itoa(o.port) + "/health"
	for name, c := range map[string]*tls.Certificate{"no certificate": nil, "a certificate of the CA": &clientCert} {
		if _, st, err := servedCN(pki.tlsClient(c, 0), url); err != nil || st != 200 {
			t.Errorf("SSL_CERT_REQS=1, a client with %s: %d, %v; want 200", name, st, err)
		}
	}
	if _, _, err := servedCN(pki.tlsClient(&strangerCert, 0), url); err == nil {
		t.Error("SSL_CERT_REQS=1 served a client whose certificate another CA issued")
	}
}

// TestTLSEncryptedPKCS8Key serves HTTPS with a key as `openssl genpkey
// -aes256` writes it (BEGIN ENCRYPTED PRIVATE KEY: PBES2, PBKDF2 with
// HMAC-SHA256, AES-256-CBC), the password in SSL_KEYFILE_PASSWORD. The
// fixture's plain copy gives the public key the test CA certifies.
func TestTLSEncryptedPKCS8Key(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile(filepath.Join("testdata", "tls", "key-plain.pem"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(raw)
	key, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	pki := newTestPKI(t)
	cert := pki.certify(t, "server", "pkcs8", false, key.(*ecdsa.PrivateKey).Public())
	encrypted, err := filepath.Abs(filepath.Join("testdata", "tls", "key-pkcs8-aes256.pem"))
	if err != nil {
		t.Fatal(err)
	}
	s := startServer(t, "WORKERS=1", "SSL_CERTFILE="+cert, "SSL_KEYFILE="+encrypted, "SSL_KEYFILE_PASSWORD=s3cret")
	url := "https://127.0.0.1:" + strconv.Itoa(s.port) + "/health"
	if cn, st, err := servedCN(pki.tlsClient(nil, 0), url); err != nil || st != 200 || cn != "pkcs8" {
		t.Errorf("GET /health over TLS = %d, certificate %q, %v; want 200 from pkcs8", st, cn, err)
	}
	s.stop()

	w := launch(t, "WORKERS=1", "SSL_CERTFILE="+cert, "SSL_KEYFILE="+encrypted, "SSL_KEYFILE_PASSWORD=S3cret")
	if code := w.wait(20 * time.Second); code != exitUsage {
		t.Errorf("wrong password: exit %d, want %d", code, exitUsage)
	}
	if out := w.logs.String(); !strings.Contains(out, encrypted+": the password does not decrypt the key") || strings.Contains(out, "S3cret") {
		t.Errorf("wrong password: output\n%s\nwant the file named, the password not shown", out)
	}
}

// TestTLSBadFilesExit2 checks that the master refuses files that do not
// load before any worker starts, naming the file and the problem.
func TestTLSBadFilesExit2(t *testing.T) {
	t.Parallel()
	pki := newTestPKI(t)
	cert, key := pki.issue(t, "server", "v1", false, "right")
	other, _ := pki.issue(t, "other", "other", false, "")
	notPEM := pki.write(t, "junk.pem", []byte("not a certificate\n"))
	for _, tc := range []struct {
		env  []string
		want string
	}{
		{[]string{"SSL_CERTFILE=" + filepath.Join(pki.dir, "missing.pem"), "SSL_KEYFILE=" + key}, "missing.pem: no such file or directory"},
		{[]string{"SSL_CERTFILE=" + notPEM, "SSL_KEYFILE=" + key}, notPEM + ": no PEM certificate in it"},
		{[]string{"SSL_CERTFILE=" + cert, "SSL_KEYFILE=" + key}, key + ": the key is encrypted and no password is given"},
		{[]string{"SSL_CERTFILE=" + cert, "SSL_KEYFILE=" + key, "SSL_KEYFILE_PASSWORD=wrong"}, key + ": the password does not decrypt the key"},
		{[]string{"SSL_CERTFILE=" + other, "SSL_KEYFILE=" + key, "SSL_KEYFILE_PASSWORD=right"}, "private key does not match public key"},
		{[]string{"SSL_CERTFILE=" + cert, "SSL_KEYFILE=" + key, "SSL_KEYFILE_PASSWORD=right", "SSL_CA_CERTS=" + notPEM, "SSL_CERT_REQS=1"}, notPEM + ": no PEM certificate in it"},
	} {
		s := launch(t, append([]string{"WORKERS=2"}, tc.env...)...)
		if code := s.wait(20 * time.Second); code != exitUsage {
			t.Errorf("%v: exit %d, want %d", tc.env, code, exitUsage)
		}
		out := s.logs.String()
		if strings.Count(out, tc.want) != 1 || strings.Contains(out, "worker started") || strings.Contains(out, "right") && strings.Contains(out, "PASSWORD") {
			t.Errorf("%v: output\n%s\nwant %q once and no worker started", tc.env, out, tc.want)
		}
	}
}

// TestTLSRenewalOnRoll replaces the certificate files under load and
// sends SIGHUP: the renewed certificate is served, and no request fails.
func TestTLSRenewalOnRoll(t *testing.T) {
	t.Parallel()
	pki := newTestPKI(t)
	cert, key := pki.issue(t, "server", "v1", false, "")
	s := startServer(t, "WORKERS=2", "SSL_CERTFILE="+cert, "SSL_KEYFILE="+key)
	url := "https://127.0.0.1:" + strconv.Itoa(s.port) + "/health"
	client := pki.tlsClient(nil, 0)

	var ok, failed, renewed atomic.Int64
	var mu sync.Mutex
	var errs []string
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				cn, st, err := servedCN(client, url)
				switch {
				case err != nil || st != 200:
					failed.Add(1)
					mu.Lock()
					errs = append(errs, fmt.Sprintf("%d %v", st, err))
					mu.Unlock()
				case cn == "v2":
					renewed.Add(1)
					ok.Add(1)
				default:
					ok.Add(1)
				}
			}
		}()
	}
	waitFor(t, 10*time.Second, func() error {
		if ok.Load() < 20 {
			return fmt.Errorf("%d requests answered before the renewal, want 20", ok.Load())
		}
		return nil
	})
	pki.issue(t, "server", "v2", false, "") // same file names, as a renewal writes them
	s.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, 30*time.Second, func() error {
		cn, _, err := servedCN(client, url)
		if err != nil || cn != "v2" {
			return fmt.Errorf("new connections get certificate %q (%v), want v2 after SIGHUP", cn, err)
		}
		return nil
	})
	before := renewed.Load()
	waitFor(t, 10*time.Second, func() error {
		if renewed.Load() < before+20 {
			return fmt.Errorf("%d requests on the renewed certificate, want %d", renewed.Load(), before+20)
		}
		return nil
	})
	close(stop)
	wg.Wait()
	t.Logf("%d requests answered, %d on the renewed certificate, %d failed", ok.Load(), renewed.Load(), failed.Load())
	if failed.Load() > 0 {
		t.Errorf("%d requests failed during the renewal: %v", failed.Load(), errs[:min(len(errs), 5)])
	}
}
