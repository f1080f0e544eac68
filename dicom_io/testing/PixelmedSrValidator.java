import com.pixelmed.dicom.AttributeList;
import com.pixelmed.validate.DicomSRValidator;
import java.io.BufferedReader;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.Map;
import java.util.Set;
import org.w3c.dom.Document;
import org.w3c.dom.NamedNodeMap;
import org.w3c.dom.Node;

/**
 * pixelmed's DicomSRValidator on many files in one JVM (dicom_io/testing/validate.py runs it).
 *
 * <p>In: one path per line on stdin. Out, for each: what `DicomSRValidator path` prints (the same
 * options as its main), or the stack trace of what it threw, then a line holding args[0] alone. One
 * validator serves every file: its output is the same as a fresh one's. Ends at the end of stdin.
 * The validator (its rules compiled: about 5 s of CPU) is made when the first readable file comes.
 *
 * <p>Every file is read and turned into pixelmed's XML document, and its second pass (the content
 * items used) runs on it. The first pass, the template rules (DicomSRDescriptionsCompiled.xsl, about
 * 6 s of CPU for one of our reports), is a pure function of the part of that document its rules
 * read: the content tree and, of the header, only SOPClassUID, VerificationFlag and InstitutionName
 * (pixelmed 20220618's rules name no other header attribute, and the header's own template outputs
 * nothing). So its output is kept per digest of exactly that part: a report that differs from an
 * earlier one only in patient or study attributes (the header tests' mutations) is read and checked
 * in full, and its template output is the one the rules gave for that identical content tree.
 */
public final class PixelmedSrValidator extends DicomSRValidator {
    private static final String HEADER = "DicomStructuredReportHeader";
    private static final Set<String> HEADER_READ = Set.of("SOPClassUID", "VerificationFlag", "InstitutionName");

    private final Map<String, String> firstPasses = new HashMap<>();

    private PixelmedSrValidator() throws Exception {
        super();
    }

    @Override
    protected String validateFirstPass(Document document)
            throws javax.xml.parsers.ParserConfigurationException,
                    javax.xml.transform.TransformerException,
                    java.io.UnsupportedEncodingException {
        String key = digest(document);
        String output = firstPasses.get(key);
        if (output == null) {
            output = super.validateFirstPass(document);
            firstPasses.put(key, output);
        }
        return output;
    }

    /** SHA-256 of the document with the header reduced to the attributes the rules read. */
    private static String digest(Document document) {
        StringBuilder text = new StringBuilder();
        write(document.getDocumentElement(), text);
        try {
            MessageDigest sha = MessageDigest.getInstance("SHA-256");
            return HexFormat.of().formatHex(sha.digest(text.toString().getBytes(StandardCharsets.UTF_8)));
        } catch (java.security.NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    private static void write(Node node, StringBuilder out) {
        if (node.getNodeType() == Node.TEXT_NODE || node.getNodeType() == Node.CDATA_SECTION_NODE) {
            String value = node.getNodeValue();
            out.append('"').append(value.length()).append(':').append(value);
            return;
        }
        if (node.getNodeType() != Node.ELEMENT_NODE) {
            return;
        }
        String name = node.getNodeName();
        out.append('<').append(name);
        NamedNodeMap attributes = node.getAttributes();
        for (int i = 0; i < attributes.getLength(); i++) {
            Node attribute = attributes.item(i);
            String value = attribute.getNodeValue();
            out.append(' ').append(attribute.getNodeName()).append('=').append(value.length()).append(':').append(value);
        }
        out.append('>');
        boolean header = name.equals(HEADER) && node.getParentNode() == node.getOwnerDocument().getDocumentElement();
        for (Node child = node.getFirstChild(); child != null; child = child.getNextSibling()) {
            if (header && !HEADER_READ.contains(child.getNodeName())) {
                continue;
            }
            write(child, out);
        }
        out.append("</").append(name).append('>');
    }

    public static void main(String[] args) {
        try {
            run(args[0]);
        } catch (Exception e) {
            throw new RuntimeException(e);
        }
    }

    private static void run(String end) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        PrintStream out = new PrintStream(new FileOutputStream(FileDescriptor.out), false, StandardCharsets.UTF_8);
        System.setOut(out);
        System.setErr(out);
        PixelmedSrValidator validator = null;
        String path;
        while ((path = in.readLine()) != null) {
            try {
                AttributeList list = new AttributeList();  // what validate(path, ...) reads first
                list.read(path);
                if (validator == null) {  // compiles the rules (about 5 s): not for a file it cannot read
                    validator = new PixelmedSrValidator();
                }
                out.print(validator.validate(list, false, true, false, false, false));
            } catch (Exception e) {
                e.printStackTrace(out);
            }
            out.println();
            out.println(end);
            out.flush();
        }
    }
}
