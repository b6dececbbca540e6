package worker

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"
)

// TLSFiles names what HTTPS serving loads, as uvicorn's --ssl-* options
// do. CertFile and KeyFile are required; the rest is optional.
type TLSFiles struct {
	// CertFile holds the server's certificate chain in PEM, leaf first.
	CertFile string
	// KeyFile holds its private key in PEM (PKCS#1, PKCS#8 or SEC 1).
	KeyFile string
	// KeyPassword decrypts an encrypted KeyFile: PKCS#8 ("BEGIN ENCRYPTED
	// PRIVATE KEY", PBES2 with PBKDF2 and AES- or 3DES-CBC) or the
	// traditional PEM way ("Proc-Type: 4,ENCRYPTED"). It is never shown in
	// errors.
	KeyPassword string
	// CAFile holds the certificates that client certificates must chain
	// to; required when ClientAuth asks for client certificates.
	CAFile string
	// ClientAuth is tls.NoClientCert (the default), tls.VerifyClientCertIfGiven
	// or tls.RequireAndVerifyClientCert.
	ClientAuth tls.ClientAuthType
}

// LoadTLS reads the files and returns the server's TLS configuration: TLS
// 1.2 at least, Go's default cipher suites, HTTP/1.1 offered by ALPN. Its
// errors name the file and the problem.
func LoadTLS(f TLSFiles) (*tls.Config, error) {
	certPEM, err := os.ReadFile(f.CertFile)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate file: %w", err)
	}
	if b, _ := pem.Decode(certPEM); b == nil || b.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("TLS certificate file %s: no PEM certificate in it", f.CertFile)
	}
	keyPEM, err := os.ReadFile(f.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("TLS key file: %w", err)
	}
	keyPEM, err = decryptKey(keyPEM, f.KeyPassword)
	if err != nil {
		return nil, fmt.Errorf("TLS key file %s: %w", f.KeyFile, err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate file %s with key file %s: %s", f.CertFile, f.KeyFile, strings.TrimPrefix(err.Error(), "tls: "))
	}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
		NextProtos:   []string{"http/1.1"},
		ClientAuth:   f.ClientAuth,
	}
	if f.CAFile != "" {
		caPEM, err := os.ReadFile(f.CAFile)
		if err != nil {
			return nil, fmt.Errorf("TLS CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, fmt.Errorf("TLS CA file %s: no PEM certificate in it", f.CAFile)
		}
		cfg.ClientCAs = pool
	}
	if f.ClientAuth != tls.NoClientCert && cfg.ClientCAs == nil {
		return nil, errors.New("TLS client certificates asked for without a CA file to verify them")
	}
	return cfg, nil
}

// decryptKey returns keyPEM with its private key decrypted by password
// when it is encrypted (PKCS#8 or the traditional PEM way), and as it is
// otherwise.
func decryptKey(keyPEM []byte, password string) ([]byte, error) {
	rest := keyPEM
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		switch {
		case b == nil:
			return nil, errors.New("no PEM private key in it")
		case b.Type == "ENCRYPTED PRIVATE KEY":
			if password == "" {
				return nil, errors.New("the key is encrypted and no password is given")
			}
			der, err := decryptPKCS8(b.Bytes, password)
			if err != nil {
				return nil, err
			}
			return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
		case !strings.HasSuffix(b.Type, "PRIVATE KEY"):
			continue
		//lint:ignore SA1019 the traditional PEM encryption is what `openssl genrsa -aes256 -traditional` writes and what uvicorn's --ssl-keyfile-password reads
		case !x509.IsEncryptedPEMBlock(b):
			return keyPEM, nil
		case password == "":
			return nil, errors.New("the key is encrypted and no password is given")
		}
		//lint:ignore SA1019 see above
		der, err := x509.DecryptPEMBlock(b, []byte(password))
		if err != nil {
			return nil, errWrongPassword
		}
		return pem.EncodeToMemory(&pem.Block{Type: b.Type, Bytes: der}), nil
	}
}
