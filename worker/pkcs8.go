package worker

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/des"
	"crypto/pbkdf2"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"hash"
)

// Encrypted PKCS#8 keys ("BEGIN ENCRYPTED PRIVATE KEY", what `openssl
// genpkey -aes256` and `openssl pkcs8 -topk8` write) use PBES2 of RFC 8018:
// a key derived from the password by PBKDF2, then CBC encryption. The
// standard library reads neither the envelope nor the scheme, so this file
// does, for the algorithms OpenSSL writes by default and on request: PBKDF2
// with HMAC-SHA1/224/256/384/512, and AES-128/192/256-CBC or 3DES-CBC.
// scrypt and the PKCS#12 schemes are refused by name.

var (
	oidPBES2  = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 5, 13}
	oidPBKDF2 = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 5, 12}
	oidScrypt = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 11591, 4, 11}
)

// prfs maps a PBKDF2 pseudo-random function's identifier to its hash.
var prfs = map[string]func() hash.Hash{
	"1.2.840.113549.2.7":  sha1.New,
	"1.2.840.113549.2.8":  sha256.New224,
	"1.2.840.113549.2.9":  sha256.New,
	"1.2.840.113549.2.10": sha512.New384,
	"1.2.840.113549.2.11": sha512.New,
}

// pbes2Cipher is a CBC scheme PBES2 names: its key length and block cipher.
type pbes2Cipher struct {
	keyLen int
	block  func(key []byte) (cipher.Block, error)
}

var pbes2Ciphers = map[string]pbes2Cipher{
	"2.16.840.1.101.3.4.1.2":  {16, aes.NewCipher},
	"2.16.840.1.101.3.4.1.22": {24, aes.NewCipher},
	"2.16.840.1.101.3.4.1.42": {32, aes.NewCipher},
	"1.2.840.113549.3.7":      {24, des.NewTripleDESCipher},
}

type algorithm struct {
	Algorithm  asn1.ObjectIdentifier
	Parameters asn1.RawValue `asn1:"optional"`
}

type encryptedPrivateKeyInfo struct {
	Algorithm     algorithm
	EncryptedData []byte
}

type pbes2Params struct {
	KeyDerivation algorithm
	Encryption    algorithm
}

type pbkdf2Params struct {
	Salt       []byte
	Iterations int
	KeyLength  int       `asn1:"optional"`
	PRF        algorithm `asn1:"optional"`
}

// errWrongPassword is what a password that does not decrypt a key gives,
// whichever check finds it.
var errWrongPassword = errors.New("the password does not decrypt the key")

// decryptPKCS8 returns the PKCS#8 PrivateKeyInfo inside der, an
// EncryptedPrivateKeyInfo, decrypted with password.
func decryptPKCS8(der []byte, password string) ([]byte, error) {
	var info encryptedPrivateKeyInfo
	if rest, err := asn1.Unmarshal(der, &info); err != nil || len(rest) > 0 {
		return nil, errors.New("an encrypted PKCS#8 key that is not well formed")
	}
	if !info.Algorithm.Algorithm.Equal(oidPBES2) {
		return nil, fmt.Errorf("an encrypted PKCS#8 key in scheme %s; only PBES2 (openssl's default) is read: re-encrypt it with openssl pkey -in KEY -aes256 -out NEW", info.Algorithm.Algorithm)
	}
	var params pbes2Params
	if _, err := asn1.Unmarshal(info.Algorithm.Parameters.FullBytes, &params); err != nil {
		return nil, errors.New("an encrypted PKCS#8 key whose PBES2 parameters are not well formed")
	}
	kdf := params.KeyDerivation.Algorithm
	if kdf.Equal(oidScrypt) {
		return nil, errors.New("an encrypted PKCS#8 key derived with scrypt, which is not read: re-encrypt it with openssl pkey -in KEY -aes256 -out NEW (PBKDF2)")
	}
	if !kdf.Equal(oidPBKDF2) {
		return nil, fmt.Errorf("an encrypted PKCS#8 key with key derivation %s; only PBKDF2 is read", kdf)
	}
	var kp pbkdf2Params
	if _, err := asn1.Unmarshal(params.KeyDerivation.Parameters.FullBytes, &kp); err != nil || kp.Iterations < 1 {
		return nil, errors.New("an encrypted PKCS#8 key whose PBKDF2 parameters are not well formed")
	}
	prf := sha1.New // the default of RFC 8018
	if kp.PRF.Algorithm != nil {
		if prf = prfs[kp.PRF.Algorithm.String()]; prf == nil {
			return nil, fmt.Errorf("an encrypted PKCS#8 key with PBKDF2 function %s, which is not read", kp.PRF.Algorithm)
		}
	}
	c, ok := pbes2Ciphers[params.Encryption.Algorithm.String()]
	if !ok {
		return nil, fmt.Errorf("an encrypted PKCS#8 key in cipher %s; AES-CBC and 3DES-CBC are read", params.Encryption.Algorithm)
	}
	var iv []byte
	if _, err := asn1.Unmarshal(params.Encryption.Parameters.FullBytes, &iv); err != nil {
		return nil, errors.New("an encrypted PKCS#8 key without a well-formed IV")
	}
	if kp.KeyLength != 0 && kp.KeyLength != c.keyLen {
		return nil, errors.New("an encrypted PKCS#8 key whose key length does not fit its cipher")
	}
	key, err := pbkdf2.Key(prf, password, kp.Salt, kp.Iterations, c.keyLen)
	if err != nil {
		return nil, fmt.Errorf("derive the key: %w", err)
	}
	block, err := c.block(key)
	if err != nil {
		return nil, fmt.Errorf("cipher: %w", err)
	}
	n, data := block.BlockSize(), info.EncryptedData
	if len(iv) != n || len(data) == 0 || len(data)%n != 0 {
		return nil, errors.New("an encrypted PKCS#8 key whose data does not fit its cipher")
	}
	plain := make([]byte, len(data))
	cipher.NewCBCDecrypter(block, iv).CryptBlocks(plain, data)
	// PKCS#7 padding; a wrong password leaves garbage here nearly always,
	// and the parse below catches the rest.
	pad := int(plain[len(plain)-1])
	if pad < 1 || pad > n {
		return nil, errWrongPassword
	}
	for _, b := range plain[len(plain)-pad:] {
		if int(b) != pad {
			return nil, errWrongPassword
		}
	}
	plain = plain[:len(plain)-pad]
	if _, err := x509.ParsePKCS8PrivateKey(plain); err != nil {
		return nil, errWrongPassword
	}
	return plain, nil
}
